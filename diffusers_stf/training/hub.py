"""Upload a finished run to the Hugging Face Hub (``create_repo`` + ``upload_folder``)."""

from __future__ import annotations

from typing import Optional, Sequence

DEFAULT_IGNORE = ("checkpoint-*", "checkpoint-*/**", "logs/**", "*.partial/**")


def push_folder_to_hub(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                       commit_message: str = "Upload trained pipeline", ignore_patterns: Sequence[str] = DEFAULT_IGNORE):
    """Create ``repo_id`` if needed and upload ``folder`` without checkpoints and logs. Returns the commit info."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("--hub_model_id must be a non-empty repo id")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                             ignore_patterns=list(ignore_patterns))
