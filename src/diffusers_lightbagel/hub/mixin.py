"""`LightBagelHubMixin`: save_pretrained, from_pretrained and push_to_hub for LightBagel pipelines."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from huggingface_hub import HfApi

from diffusers.utils import logging

from .constants import (
    COMPONENT_NAMES,
    MODEL_CARD_FILENAME,
    MODEL_INDEX_FILENAME,
    PICKLE_SUFFIXES,
    REMOTE_CODE_FILENAME,
)
from .files import _merge_staged_folder, _relative_files, make_staging_folder, write_text_atomic
from .templates import normalize_model_index, render_model_card, render_remote_code
from .validation import validate_repository


logger = logging.get_logger(__name__)

_VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")


def _check_variant(variant: str | None) -> None:
    if variant is not None and (not isinstance(variant, str) or not _VARIANT_PATTERN.match(variant)):
        raise ValueError(f"variant must be None or a name of letters, digits and '_' such as 'fp16'; got {variant!r}.")


_DTYPE_VARIANTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LightBagelHubMixin:
    """`save_pretrained`, `from_pretrained` and `push_to_hub` for LightBagel pipelines.

    Placed before `DiffusionPipeline` in the bases of a pipeline. Every method ends in diffusers' own implementation
    and adds the LightBagel parts: the remote-code module, the model card, stable library names in model_index.json,
    staged writes and a repository check before loading.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a LightBagel pipeline from a folder or a Hub repository id, after checking the repository.

        Accepts every argument of `DiffusionPipeline.from_pretrained` (`dtype`, `variant`, `device_map`,
        `cache_dir`, `local_files_only`, component overrides such as `transformer=...`). A broken repository or one
        written by a newer diffusers-lightbagel raises `LightBagelRepositoryError` naming the file and the field
        before any weight is loaded.
        """
        name = str(pretrained_model_name_or_path)
        if os.path.isdir(name):
            folder = name
        elif name.count("/") > 1:
            raise ValueError(f"{name!r} is neither an existing folder nor a Hub repository id of the form 'org/name'.")
        else:
            folder = cls.download(name, **kwargs)

        passed = [component for component in COMPONENT_NAMES if component in kwargs]
        validate_repository(folder, pipeline_class=cls, passed_components=passed, variant=kwargs.get("variant"))

        pipeline = super().from_pretrained(folder, **kwargs)
        pipeline.register_to_config(_name_or_path=name)
        return pipeline

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        overwrite: bool = False,
        repo_id: str | None = None,
        base_model: Iterable[str] | None = None,
        license: str | None = None,
        **kwargs,
    ):
        """Save the pipeline as a Hub-ready folder: components, model_index.json, pipeline_lightbagel.py, README.md.

        Everything is written to a temporary folder next to `save_directory` first and then moved in, so an error
        leaves `save_directory` as it was. Files that exist there with other content are replaced only with
        `overwrite=True`, and an existing README.md is kept unless `overwrite=True`.

        Args:
            safe_serialization: safetensors (the default). `False` lets the components write pickle files.
            variant: a file-name tag such as "fp16" or "bf16" (`diffusion_pytorch_model.fp16.safetensors`). It names
                the files and does not convert the weights: cast the pipeline first (`pipe.to(torch.float16)`) or
                load it with `dtype=`.
            max_shard_size: shard each model's weights into files of at most this size ("5GB", or bytes), with an
                index file.
            push_to_hub: also upload the folder, as `push_to_hub(repo_id, ...)` does. `commit_message`, `private`,
                `token` and `create_pr` are read from the keyword arguments.
            repo_id: the repository id written in the model card's usage snippet (and the upload target with
                `push_to_hub=True`). The folder's name by default.
            base_model, license: model card metadata, by default the two base models and "apache-2.0".
        """
        _check_variant(variant)
        if not isinstance(safe_serialization, bool):
            raise TypeError(f"safe_serialization must be True or False; got {safe_serialization!r}.")
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"save_directory {target} exists and is not a folder.")
        if variant in _DTYPE_VARIANTS:
            self._warn_on_variant_dtype_mismatch(variant)

        if push_to_hub:
            return self.push_to_hub(
                repo_id or target.name,
                commit_message=kwargs.pop("commit_message", None),
                private=kwargs.pop("private", None),
                token=kwargs.pop("token", None),
                create_pr=kwargs.pop("create_pr", False),
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                base_model=base_model,
                license=license,
                save_directory=target,
                overwrite=overwrite,
            )

        staged = make_staging_folder(target)
        try:
            card_repo_id = repo_id or target.name
            self._save_staged(
                staged, safe_serialization, variant, max_shard_size, card_repo_id, base_model, license, kwargs
            )
            if not target.exists():
                os.replace(staged, target)
            else:
                _merge_staged_folder(staged, target, overwrite, variant)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        logger.info(f"Saved {type(self).__name__} to {target}.")

    def _save_staged(self, staged, safe_serialization, variant, max_shard_size, repo_id, base_model, license, kwargs):
        super().save_pretrained(
            staged, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size, **kwargs
        )
        class_name = type(self).__name__
        index_path = staged / MODEL_INDEX_FILENAME
        with open(index_path, encoding="utf-8") as file:
            model_index = json.load(file)
        normalized = normalize_model_index(model_index, class_name)
        write_text_atomic(index_path, json.dumps(normalized, indent=2, sort_keys=True) + "\n")
        write_text_atomic(staged / REMOTE_CODE_FILENAME, render_remote_code(class_name))
        write_text_atomic(staged / MODEL_CARD_FILENAME, render_model_card(class_name, repo_id, base_model, license))

        if safe_serialization:
            pickled = [name for name in _relative_files(staged) if name.endswith(PICKLE_SUFFIXES)]
            if pickled:
                raise RuntimeError(f"safe_serialization=True but the components wrote pickle files: {pickled}.")

    def _warn_on_variant_dtype_mismatch(self, variant: str) -> None:
        expected = _DTYPE_VARIANTS[variant]
        for name in ("vlm", "transformer", "vae"):
            module = getattr(self, name, None)
            if not isinstance(module, torch.nn.Module) or module.dtype == expected:
                continue
            # A float32 VAE next to half-precision models is the recommended setting, not a mistake.
            if name == "vae" and module.dtype == torch.float32:
                continue
            logger.warning(
                f"variant={variant!r} only names the files; the {name} weights are {module.dtype} and are saved "
                f"as such. Cast first (pipe.{name}.to({expected})) if the files should hold {expected} weights."
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        base_model: Iterable[str] | None = None,
        license: str | None = None,
        save_directory: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> Any:
        """Save the pipeline with its model card and remote-code module and upload the folder to `repo_id`.

        The repository is created if needed. Without `save_directory` the files are staged in a temporary folder
        that is removed after the upload. Returns huggingface_hub's `CommitInfo`.
        """
        if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
            raise ValueError(f"repo_id must be 'name' or 'org/name'; got {repo_id!r}.")
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id

        save_kwargs = dict(
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            repo_id=repo_id,
            base_model=base_model,
            license=license,
        )
        with tempfile.TemporaryDirectory() as temporary:
            folder = Path(save_directory) if save_directory is not None else Path(temporary) / "repository"
            self.save_pretrained(folder, overwrite=overwrite, **save_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                commit_message=commit_message or f"Upload {type(self).__name__}",
                create_pr=create_pr,
            )
