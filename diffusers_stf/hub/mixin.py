"""``RemoteCodeMixin``: the save/load of the package's pipelines (the layout is in :mod:`.layout`)."""

from __future__ import annotations

import json
import os
import shutil
from types import ModuleType
from typing import Dict, Optional

from .layout import package_view, write_remote_code


def resolve_folder(path_or_repo: str, download_kwargs: Dict) -> str:
    """A local folder for ``path_or_repo``: the folder itself, or a Hub snapshot (downloaded, or from the cache).

    diffusers' own download step cannot resolve components that live in an installed package, so repo ids go through
    ``huggingface_hub.snapshot_download`` first."""
    path = os.fspath(path_or_repo)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(path, **download_kwargs)
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as err:
        raise OSError(
            f"cannot load {path!r}: there is no such folder ({os.path.abspath(path)}), and it is not a Hub repo "
            f"found in the local Hub cache or on the Hub ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


class RemoteCodeMixin:
    """``save_pretrained`` writes the remote-code layout; ``from_pretrained`` loads it (and folders that name
    ``["diffusers_stf", Class]``) through the package's classes. Mixed into the package's pipelines, before
    ``DiffusionPipeline``.

    Attributes:
        component_library: the module that binds every class of the package a saved folder's components may be,
            and diffusers' ``ModelMixin`` and ``SchedulerMixin`` (set by the pipelines layer). ``from_pretrained``
            names it as the components' library; the bundle drops this attribute.
    """

    component_library: Optional[ModuleType] = None

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size=None, push_to_hub: bool = False, **kwargs):
        """Save as diffusers does, then add the code files so that ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)`` loads the folder without this package.

        Args:
            save_directory: the folder.
            push_to_hub: also upload the folder (``repo_id``, ``token``, ``private``, ``commit_message`` as in
                diffusers).
            **kwargs: passed to ``DiffusionPipeline.save_pretrained``.
        """
        hub_keys = ("repo_id", "token", "private", "commit_message", "create_pr")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, **kwargs)
        write_remote_code(self, os.fspath(save_directory))
        if push_to_hub:
            from huggingface_hub import HfApi

            folder = os.fspath(save_directory)
            api = HfApi(token=hub_kwargs.get("token"))
            repo_id = hub_kwargs.get("repo_id") or os.path.basename(os.path.normpath(folder))
            repo_id = api.create_repo(repo_id, private=bool(hub_kwargs.get("private", False)), exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=folder, create_pr=bool(hub_kwargs.get("create_pr", False)),
                              commit_message=hub_kwargs.get("commit_message") or "Upload pipeline")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder or Hub repo written by ``save_pretrained`` (any layout) with this package's classes (those
        of :attr:`component_library`), never through the code stored in the folder.

        ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to the download; all
        other keyword arguments (e.g. ``discriminator=None``, ``torch_dtype``) go to
        ``DiffusionPipeline.from_pretrained``.
        """
        download_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download")
        download_kwargs = {k: kwargs.pop(k) for k in download_keys if k in kwargs}
        folder = resolve_folder(pretrained_model_name_or_path, download_kwargs)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise OSError(f"{folder} has no model_index.json: it is not a saved pipeline folder")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        view = package_view(folder, index, cls.component_library)
        try:
            pipeline = super().from_pretrained(view, **kwargs)
        finally:
            shutil.rmtree(view, ignore_errors=True)
        pipeline.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipeline
