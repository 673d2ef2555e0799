"""Uploads to the Hugging Face Hub: ``--push_to_hub`` that fails before training or retries cleanly after it, and the
command that uploads a finished folder (again).

A training script calls, on the main process:

1. :func:`check_hub_settings` while parsing its options (a token, a well-formed ``namespace/name`` repo id; the
   default id is ``<your namespace>/<output_dir name>``);
2. :func:`create_repo_early` before the first training step, as diffusers' ``train_unconditional.py`` does;
3. :func:`push_or_explain` at the end: if the upload fails, every local file stays, and the run exits non-zero with
   one message that prints the command that retries it (:func:`retry_command`).

The retry command is :func:`main`, run as

    python -m diffusers_stf.push OUTPUT_DIR --hub_model_id namespace/name [--private] [--hub_token TOKEN]

It uploads the folder without checkpoints and logs; nothing is retrained. A model card written for the local folder
(its snippets load ``OUTPUT_DIR``) is pointed at the repo id before the upload.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from typing import List, Optional, Sequence

from huggingface_hub import HfApi

# the run's own bookkeeping stays local: checkpoints, logs, temporaries, run.json (local paths), the lock, the
# record of a finished run
DEFAULT_IGNORE = ("checkpoint-*", "checkpoint-*/**", "logs/**", "*.partial/**", "final.old/**", "run.json", "run.lock",
                  "training_finished.json")
# the entry point that runs main(): diffusers_stf/push.py
PUSH_MODULE = f"{__name__.split('.')[0]}.push"


def _token(hub_token: Optional[str]) -> Optional[str]:
    if hub_token:
        return hub_token
    from huggingface_hub import get_token

    return get_token()


def check_hub_settings(push_to_hub: bool, hub_model_id: Optional[str], hub_token: Optional[str], output_dir: str,
                       api: Optional[HfApi] = None) -> Optional[str]:
    """The ``namespace/name`` repo id to push to (None without ``push_to_hub``); ValueError for what cannot work.

    Args:
        push_to_hub: ``--push_to_hub``.
        hub_model_id: ``--hub_model_id``; a name without a namespace gets the token owner's namespace.
        hub_token: ``--hub_token`` (default: the token of ``hf auth login`` / ``HF_TOKEN``).
        output_dir: ``--output_dir``; its last folder name is the default repo name.
        api: a ``HfApi`` (tests pass a stand-in).
    """
    if not push_to_hub:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    token = _token(hub_token)
    if not token:
        raise ValueError("uploading to the Hub (--push_to_hub) needs a Hugging Face token: run `hf auth login`, set "
                         "HF_TOKEN, or pass --hub_token")
    repo_id = hub_model_id or os.path.basename(os.path.normpath(output_dir))
    if repo_id.count("/") > 1:
        raise ValueError(f"--hub_model_id must be 'namespace/name', got {repo_id!r}")
    if "/" not in repo_id:
        api = api or HfApi(token=token)
        try:
            namespace = api.whoami(token=token)["name"]
        except Exception as err:  # noqa: BLE001  (offline, a revoked token, …: all mean "cannot tell")
            raise ValueError(
                f"--push_to_hub: cannot find the namespace of your token ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); pass --hub_model_id namespace/{repo_id}"
            ) from err
        repo_id = f"{namespace}/{repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repo id: {err}") from err
    return repo_id


def create_repo_early(repo_id: str, hub_token: Optional[str] = None, private: bool = False,
                      api: Optional[HfApi] = None) -> str:
    """Create ``repo_id`` (if needed) before training, so that a bad token or a taken name stops the run at once.

    Returns the repo id the Hub reports. Exits (``SystemExit`` with a one-line reason) when the Hub refuses."""
    api = api or HfApi(token=_token(hub_token))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as err:  # noqa: BLE001  (any failure stops the run before training, with its reason)
        raise SystemExit(f"--push_to_hub: cannot create the Hub repo {repo_id!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); nothing was trained") from err
    return getattr(url, "repo_id", None) or repo_id


def retry_command(output_dir: str, repo_id: str, private: bool = False) -> str:
    """The shell command that uploads ``output_dir`` again."""
    command = ["python", "-m", PUSH_MODULE, os.path.abspath(output_dir), "--hub_model_id", repo_id]
    if private:
        command.append("--private")
    return " ".join(shlex.quote(part) for part in command)


def push_folder_to_hub(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                       commit_message: str = "Upload trained pipeline", ignore_patterns: Sequence[str] = DEFAULT_IGNORE,
                       api: Optional[HfApi] = None):
    """Create ``repo_id`` if needed and upload ``folder`` without checkpoints and logs. Returns the commit info."""
    if not repo_id:
        raise ValueError("--hub_model_id must be a non-empty repo id")
    api = api or HfApi(token=_token(token))
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                             ignore_patterns=list(ignore_patterns), repo_type="model")


def push_or_explain(output_dir: str, repo_id: str, hub_token: Optional[str] = None, private: bool = False,
                    commit_message: str = "Upload trained pipeline", ignore_patterns: Sequence[str] = DEFAULT_IGNORE,
                    api: Optional[HfApi] = None):
    """Upload ``output_dir``; on failure keep every file and exit non-zero with the command that retries.

    Returns the commit info. Raises ``SystemExit`` (one message, no traceback in a script) when the upload fails."""
    try:
        return push_folder_to_hub(output_dir, repo_id, token=hub_token, private=private,
                                  commit_message=commit_message, ignore_patterns=ignore_patterns, api=api)
    except Exception as err:  # noqa: BLE001  (whatever failed, the local folder is complete: say how to retry)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise SystemExit(
            f"Upload of {os.path.abspath(output_dir)} to the Hub repo {repo_id} failed ({reason}).\n"
            f"Every file is kept in {os.path.abspath(output_dir)}. Retry the upload with:\n"
            f"  {retry_command(output_dir, repo_id, private)}"
        ) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PUSH_MODULE}",
                                     description="Upload a finished training folder to the Hugging Face Hub (again).",
                                     allow_abbrev=False)
    parser.add_argument("output_dir", help="the folder a training script wrote (model_index.json, README.md, …)")
    parser.add_argument("--hub_model_id", required=True, help="namespace/name (a bare name gets your namespace)")
    parser.add_argument("--hub_token", default=None, help="default: the token of `hf auth login` / HF_TOKEN")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit_message", default="Upload trained pipeline")
    return parser


def point_card_at_repo(output_dir: str, repo_id: str) -> bool:
    """Replace the local folder in ``README.md``'s snippets by ``repo_id``; returns whether the card changed.

    A card written for a local folder names it in ``from_pretrained("…")`` by its path relative to the run's working
    directory, by its name, or by its absolute path (``training.model_card.local_name``); each is a trailing part of
    the folder's absolute path, whatever the working directory is now."""
    card = os.path.join(output_dir, "README.md")
    if not os.path.isfile(card):
        return False
    with open(card, encoding="utf-8") as f:
        text = f.read()
    parts = os.path.abspath(output_dir).split(os.sep)
    names = {os.path.abspath(output_dir)} | {os.sep.join(parts[i:]) for i in range(1, len(parts)) if parts[i]}

    def repoint(match):
        return f'{match.group(1)}"{repo_id}"' if os.path.normpath(match.group(2)) in names else match.group(0)

    new = re.sub(r'(from_pretrained\()"([^"\n]+)"', repoint, text)
    if new != text:
        with open(card, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def main(argv: Optional[List[str]] = None) -> str:
    """The retry command: check ``OUTPUT_DIR`` and the settings, create the repo, point the card at it, upload.
    Returns the repo id."""
    args = build_parser().parse_args(argv)
    folder = args.output_dir
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder} is not a folder")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in ("model_index.json", "config.json")):
        raise SystemExit(f"{folder} has neither model_index.json nor config.json: not a saved pipeline or model")
    try:
        repo_id = check_hub_settings(True, args.hub_model_id, args.hub_token, folder)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    repo_id = create_repo_early(repo_id, args.hub_token, private=args.private)
    point_card_at_repo(folder, repo_id)
    push_or_explain(folder, repo_id, args.hub_token, private=args.private, commit_message=args.commit_message)
    print(f"Uploaded {os.path.abspath(folder)} to https://huggingface.co/{repo_id}")
    return repo_id
