"""Upload a finished training folder to the Hugging Face Hub (again).

    python -m diffusers_stf.push OUTPUT_DIR --hub_model_id namespace/name [--private] [--hub_token TOKEN]

The training scripts print this command when their final upload fails; the folder is complete on disk, so nothing is
retrained. Checkpoints and logs are not uploaded. A model card written for the local folder (its snippets load
``OUTPUT_DIR``) is pointed at the repo id before the upload.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .training.hub import check_hub_settings, create_repo_early, push_or_explain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusers_stf.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the folder a training script wrote (model_index.json, README.md, …)")
    parser.add_argument("--hub_model_id", required=True, help="namespace/name (a bare name gets your namespace)")
    parser.add_argument("--hub_token", default=None, help="default: the token of `hf auth login` / HF_TOKEN")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit_message", default="Upload trained pipeline")
    return parser


def point_card_at_repo(output_dir: str, repo_id: str) -> bool:
    """Replace the local folder in ``README.md``'s snippets by ``repo_id``; returns whether the card changed."""
    card = os.path.join(output_dir, "README.md")
    if not os.path.isfile(card):
        return False
    with open(card, encoding="utf-8") as f:
        text = f.read()
    new = text.replace(f'"{os.path.abspath(output_dir)}"', f'"{repo_id}"')
    if new != text:
        with open(card, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def main(argv: Optional[List[str]] = None) -> str:
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


if __name__ == "__main__":
    main(sys.argv[1:])
