"""``--push_to_hub`` that fails before training or retries cleanly after it.

A training script calls, on the main process:

1. :func:`check_hub_settings` while parsing its options (a token, a well-formed ``namespace/name`` repo id; the
   default id is ``<your namespace>/<output_dir name>``);
2. :func:`create_repo_early` before the first training step, as diffusers' ``train_unconditional.py`` does;
3. :func:`push_or_explain` at the end: if the upload fails, every local file stays, and the run exits non-zero with
   one message that prints the command that retries it (``python -m diffusers_stf.push OUTPUT_DIR --hub_model_id …``).
"""

from __future__ import annotations

import os
import shlex
from typing import Optional, Sequence

from huggingface_hub import HfApi

DEFAULT_IGNORE = ("checkpoint-*", "checkpoint-*/**", "logs/**", "*.partial/**")


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
    command = ["python", "-m", "diffusers_stf.push", os.path.abspath(output_dir), "--hub_model_id", repo_id]
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
