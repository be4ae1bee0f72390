"""Saving, loading and sharing LightBagel pipelines on the Hugging Face Hub.

A LightBagel repository is an ordinary diffusers pipeline folder (`model_index.json` plus one folder per component)
with two additions written by `LightBagelHubMixin.save_pretrained`:

- `pipeline_lightbagel.py`, a small module that re-exports the saved pipeline class from the installed
  `diffusers_lightbagel` package. diffusers loads it only when asked to, with
  `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_lightbagel", trust_remote_code=True)`, which
  lets a process that never imported `diffusers_lightbagel` load the pipeline.
- `README.md`, a model card with the library name, task tags, base models, license and a usage snippet.

How diffusers 0.42 resolves the names in `model_index.json`, which decides the layout:

- a string `_class_name` is looked up as an attribute of the `diffusers` module. Importing `diffusers_lightbagel`
  registers the LightBagel classes there, so `DiffusionPipeline.from_pretrained(repo)` works after that import and
  raises `AttributeError: module diffusers has no attribute LightBagelPipeline` without it. diffusers offers no
  hook to change that message.
- a list `_class_name` (`["pipeline_lightbagel", "LightBagelPipeline"]`) would route every load through remote code,
  even `LightBagelPipeline.from_pretrained`, so it would require `trust_remote_code=True` everywhere. The string
  form is written instead.
- a component entry `[library, class]` is resolved by importing `library` and looking up both the class and
  diffusers' base classes (`ModelMixin`, ...) on it. `["diffusers_lightbagel", "LightBagelTransformer2DModel"]` fails
  that lookup because the package's top level does not export `ModelMixin`. `["diffusers",
  "LightBagelTransformer2DModel"]` resolves through the registration above and does not depend on the module path of
  the class, so the transformer entry is saved in that form.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from packaging import version as packaging_version
from safetensors import safe_open

from diffusers.utils import logging


logger = logging.get_logger(__name__)

COMPONENT_NAMES = ("vlm", "processor", "transformer", "vae", "scheduler")
REMOTE_CODE_MODULE = "pipeline_lightbagel"
REMOTE_CODE_FILENAME = f"{REMOTE_CODE_MODULE}.py"
MODEL_INDEX_FILENAME = "model_index.json"
MODEL_CARD_FILENAME = "README.md"
# model_index.json key that records the diffusers-lightbagel version that wrote the repository.
VERSION_KEY = "_diffusers_lightbagel_version"
# The library under which LightBagel classes are recorded in model_index.json (see the module docstring).
COMPONENT_LIBRARY = "diffusers"
PACKAGE_NAME = "diffusers_lightbagel"
PIP_NAME = "diffusers-lightbagel"

BASE_MODELS = ("Qwen/Qwen2.5-VL-7B-Instruct", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")
# The model card's license unless the caller passes `license=`.
DEFAULT_LICENSE = "apache-2.0"
PIPELINE_TASKS = {"LightBagelPipeline": "text-to-image", "LightBagelEditPipeline": "image-to-image"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")


class LightBagelRepositoryError(ValueError):
    """A LightBagel repository that cannot be loaded: a missing file, an unknown config field or mismatched shapes.

    `file` is the path, relative to the repository root, of the file at fault, and `field` is the config field or
    tensor name.
    """

    def __init__(self, message: str, file: str, field: str | None = None):
        super().__init__(message)
        self.file = file
        self.field = field


def _package_version() -> str:
    # Imported here because this module is imported while the package itself is being initialised.
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------- file texts
def render_remote_code(pipeline_class_name: str, minimum_version: str | None = None) -> str:
    """Return the text of `pipeline_lightbagel.py` for a repository whose pipeline is `pipeline_class_name`.

    The module defines no pipeline code: it imports the class from the installed package, so a repository cannot
    run code other than the package's own. diffusers picks the one `DiffusionPipeline` subclass the module contains,
    so each module exports exactly one.
    """
    if pipeline_class_name not in PIPELINE_TASKS:
        raise ValueError(f"pipeline_class_name must be one of {sorted(PIPELINE_TASKS)}; got {pipeline_class_name!r}.")
    minimum_version = minimum_version or _package_version()
    return f'''"""Remote-code entry point of a LightBagel repository.

`DiffusionPipeline.from_pretrained(repo, custom_pipeline="{REMOTE_CODE_MODULE}", trust_remote_code=True)` loads
{pipeline_class_name} through this file without a prior `import {PACKAGE_NAME}`. The pipeline code is not in the
repository: this module imports it from the installed {PIP_NAME} package (`pip install {PIP_NAME}`).
"""

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


MINIMUM_VERSION = "{minimum_version}"

try:
    installed_version = version("{PIP_NAME}")
except PackageNotFoundError as error:
    raise ImportError(
        "This repository holds a LightBagel pipeline, which needs the {PIP_NAME} package: "
        "run `pip install {PIP_NAME}>={minimum_version}`."
    ) from error
if Version(installed_version) < Version(MINIMUM_VERSION):
    raise ImportError(
        f"This repository was saved by {PIP_NAME} {{MINIMUM_VERSION}} but {{installed_version}} is installed; "
        "run `pip install -U {PIP_NAME}`."
    )

# diffusers executes every repository's {REMOTE_CODE_FILENAME} into one shared module object and then takes its only
# DiffusionPipeline subclass, so a class left there by an earlier repository is removed first.
for _name in {sorted(PIPELINE_TASKS)!r}:
    globals().pop(_name, None)

from {PACKAGE_NAME} import {pipeline_class_name}  # noqa: E402


__all__ = ["{pipeline_class_name}"]
'''


def render_model_card(
    pipeline_class_name: str,
    repo_id: str,
    base_model: Iterable[str] | None = None,
    license: str | None = None,
) -> str:
    """Return the README.md model card of a repository holding a `pipeline_class_name` pipeline at `repo_id`."""
    if pipeline_class_name not in PIPELINE_TASKS:
        raise ValueError(f"pipeline_class_name must be one of {sorted(PIPELINE_TASKS)}; got {pipeline_class_name!r}.")
    base_models = list(BASE_MODELS if base_model is None else base_model)
    card_data = ModelCardData(
        library_name="diffusers",
        license=license or DEFAULT_LICENSE,
        base_model=base_models,
        pipeline_tag=PIPELINE_TASKS[pipeline_class_name],
        tags=["diffusers", PIP_NAME, "lightbagel", "text-to-image", "image-to-image"],
    )
    if pipeline_class_name == "LightBagelEditPipeline":
        call = (
            'from diffusers.utils import load_image\n\n'
            'image = pipe(image=load_image("input.png"), prompt="make the sky orange").images[0]'
        )
    else:
        call = 'image = pipe("a red circle to the left of a blue square").images[0]'
    body = f"""
# LightBagel ({pipeline_class_name})

A LightBagel pipeline for diffusers: a frozen Qwen2.5-VL understanding branch and a Wan2.2 diffusion transformer
joined by fusion attention blocks. Both text-to-image (`LightBagelPipeline`) and instruction editing
(`LightBagelEditPipeline`) run on these weights.

## Usage

Install the plugin with `pip install {PIP_NAME}`, then:

```py
import torch
from {PACKAGE_NAME} import {pipeline_class_name}

pipe = {pipeline_class_name}.from_pretrained(
    "{repo_id}", torch_dtype={{"default": torch.bfloat16, "vae": torch.float32}}
).to("cuda")
{call}
```

Other ways to load the same repository:

- `import {PACKAGE_NAME}` and then `diffusers.DiffusionPipeline.from_pretrained("{repo_id}")`.
- Without importing the plugin (it must still be installed):
  `DiffusionPipeline.from_pretrained("{repo_id}", custom_pipeline="{REMOTE_CODE_MODULE}", trust_remote_code=True)`.
  Without the import and without these two arguments diffusers raises
  `AttributeError: module diffusers has no attribute {pipeline_class_name}`.
- The other task on the same components: `LightBagelEditPipeline.from_pipe(pipe)` or
  `LightBagelPipeline.from_pipe(pipe)`.

## Base models

{chr(10).join(f"- [{name}](https://huggingface.co/{name})" for name in base_models)}
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


# ---------------------------------------------------------------------------------------------------- model index
def normalize_model_index(model_index: dict, pipeline_class_name: str) -> dict:
    """Return `model_index` with LightBagel classes recorded as `["diffusers", class]` and the package version."""
    normalized = dict(model_index)
    normalized["_class_name"] = pipeline_class_name
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        library, class_name = entry
        if isinstance(library, str) and library.split(".")[0] == PACKAGE_NAME:
            normalized[name] = [COMPONENT_LIBRARY, class_name]
    normalized[VERSION_KEY] = _package_version()
    return normalized


# ---------------------------------------------------------------------------------------------------- file writing
def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _same_content(first: Path, second: Path) -> bool:
    if first.stat().st_size != second.stat().st_size:
        return False
    digests = []
    for path in (first, second):
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        digests.append(digest.digest())
    return digests[0] == digests[1]


def _weight_file_pattern(variant: str | None) -> re.Pattern:
    """Match the weight and index files diffusers and transformers write for one variant (or none)."""
    tag = re.escape(f".{variant}") if variant else ""
    return re.compile(
        rf"^(diffusion_pytorch_model|model|pytorch_model)({tag}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)"
        rf"|\.(safetensors|bin)\.index{tag}\.json)$"
    )


def _merge_staged_folder(staged: Path, target: Path, overwrite: bool, variant: str | None) -> None:
    """Move every file of `staged` into `target`, each with an atomic `os.replace`.

    A file that exists in `target` with other content is replaced only with `overwrite=True`, and then stale weight
    shards of the same variant are removed, so a repository never mixes two shardings. A README.md the user already
    has is kept unless `overwrite=True`.
    """
    staged_files = _relative_files(staged)
    conflicts = [
        name
        for name in staged_files
        if name != MODEL_CARD_FILENAME
        and (target / name).is_file()
        and not _same_content(staged / name, target / name)
    ]
    if conflicts and not overwrite:
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise FileExistsError(
            f"{target} already contains different versions of {shown}; pass overwrite=True to replace them, or "
            "save to an empty folder."
        )

    if overwrite:
        pattern = _weight_file_pattern(variant)
        staged_set = set(staged_files)
        for component_folder in {Path(name).parent for name in staged_files if Path(name).parent != Path(".")}:
            existing = target / component_folder
            if not existing.is_dir():
                continue
            for path in existing.iterdir():
                relative = str(component_folder / path.name)
                if path.is_file() and pattern.match(path.name) and relative not in staged_set:
                    logger.info(f"Removing {relative} from {target}: it belongs to an earlier sharding.")
                    path.unlink()

    for name in staged_files:
        destination = target / name
        if name == MODEL_CARD_FILENAME and destination.is_file() and not overwrite:
            logger.info(f"Keeping the existing {destination}; pass overwrite=True to replace it with a new card.")
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, destination)


# ---------------------------------------------------------------------------------------------------- validation
def _read_json(folder: Path, relative: str) -> dict:
    path = folder / relative
    if not path.is_file():
        raise LightBagelRepositoryError(f"{relative} is missing from {folder}.", file=relative)
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        message = f"{relative} in {folder} is not valid JSON: {error}."
        raise LightBagelRepositoryError(message, file=relative) from error


def _newer_repository_hint(model_index: dict) -> str:
    saved_version = model_index.get(VERSION_KEY)
    installed = _package_version()
    if saved_version and packaging_version.parse(str(saved_version)) > packaging_version.parse(installed):
        return (
            f" The repository was saved by {PIP_NAME} {saved_version} and {installed} is installed; "
            f"run `pip install -U {PIP_NAME}`."
        )
    return ""


def _init_keys(model_class: type) -> set[str]:
    parameters = inspect.signature(model_class.__init__).parameters
    return {name for name in parameters if name not in ("self", "args", "kwargs")}


def _checkpoint_shapes(folder: Path, component: str, variant: str | None) -> tuple[str, dict[str, tuple]] | None:
    """Return (weight file description, tensor shapes) of a diffusers component's safetensors checkpoint, or None."""
    component_folder = folder / component
    for tag in ([f".{variant}"] if variant else []) + [""]:
        single = component_folder / f"diffusion_pytorch_model{tag}.safetensors"
        index = component_folder / f"diffusion_pytorch_model.safetensors.index{tag}.json"
        if single.is_file():
            files = {single.name: single}
            description = f"{component}/{single.name}"
        elif index.is_file():
            weight_map = _read_json(folder, f"{component}/{index.name}").get("weight_map", {})
            files = {name: component_folder / name for name in sorted(set(weight_map.values()))}
            description = f"{component}/{index.name}"
        else:
            continue
        shapes = {}
        for name, path in files.items():
            if not path.is_file():
                raise LightBagelRepositoryError(
                    f"{description} lists the shard {component}/{name}, which is missing from {folder}.",
                    file=f"{component}/{name}",
                )
            with safe_open(str(path), framework="pt", device="cpu") as checkpoint:
                for key in checkpoint.keys():
                    shapes[key] = tuple(checkpoint.get_slice(key).get_shape())
        return description, shapes
    return None


def _check_model_component(
    folder: Path, component: str, model_class: type, variant: str | None, strict_fields: bool, hint: str
) -> dict:
    """Check a diffusers model's config fields and its checkpoint's tensor names and shapes, and return its config."""
    config_file = f"{component}/{model_class.config_name}"
    config = _read_json(folder, config_file)
    unknown = sorted(key for key in config if not key.startswith("_") and key not in _init_keys(model_class))
    if unknown and strict_fields:
        raise LightBagelRepositoryError(
            f"{config_file} has the field {unknown[0]!r}, which {model_class.__name__} of {PIP_NAME} "
            f"{_package_version()} does not know (unknown fields: {unknown})."
            f"{hint or ' Remove the field or upgrade.'}",
            file=config_file,
            field=unknown[0],
        )
    if unknown:
        logger.warning(f"{config_file} has fields that {model_class.__name__} ignores: {unknown}.")

    init_config = {key: value for key, value in config.items() if key in _init_keys(model_class)}
    try:
        with torch.device("meta"):
            model = model_class.from_config(init_config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise LightBagelRepositoryError(
            f"{config_file} does not describe a valid {model_class.__name__}: {error}", file=config_file
        ) from error
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}

    found = _checkpoint_shapes(folder, component, variant)
    if found is None:
        logger.info(f"No safetensors weights found in {folder / component}; skipping the shape check.")
        return config
    weights_file, shapes = found
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise LightBagelRepositoryError(
            f"{weights_file} lacks {len(missing)} tensors that {config_file} requires, first {missing[0]!r}.{hint}",
            file=weights_file,
            field=missing[0],
        )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise LightBagelRepositoryError(
            f"{weights_file} has {len(unexpected)} tensors that {model_class.__name__} built from {config_file} "
            f"does not have, first {unexpected[0]!r}.{hint}",
            file=weights_file,
            field=unexpected[0],
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise LightBagelRepositoryError(
                f"{weights_file}: tensor {name!r} has shape {list(shapes[name])} but {config_file} gives "
                f"{list(shape)}; the weights and the config belong to different models.",
                file=weights_file,
                field=name,
            )
    return config


def _vlm_text_field(config: dict, field: str):
    text_config = config.get("text_config") or {}
    return text_config.get(field, config.get(field))


def _check_consistency(transformer_config: dict | None, vae_config: dict | None, vlm_config: dict | None) -> None:
    """Check the fields that must agree between components, naming both files."""
    pairs = []
    if transformer_config is not None and vlm_config is not None:
        pairs += [
            ("vlm_hidden_size", "vlm/config.json", "hidden_size", _vlm_text_field(vlm_config, "hidden_size")),
            ("text_dim", "vlm/config.json", "hidden_size", _vlm_text_field(vlm_config, "hidden_size")),
            (
                "vlm_num_layers",
                "vlm/config.json",
                "num_hidden_layers",
                _vlm_text_field(vlm_config, "num_hidden_layers"),
            ),
        ]
    if transformer_config is not None and vae_config is not None:
        pairs.append(("in_channels", "vae/config.json", "z_dim", vae_config.get("z_dim")))
    for field, other_file, other_field, other_value in pairs:
        value = transformer_config.get(field)
        if value is not None and other_value is not None and value != other_value:
            raise LightBagelRepositoryError(
                f"transformer/config.json has {field}={value} but {other_file} has {other_field}={other_value}; "
                "the components come from different models.",
                file="transformer/config.json",
                field=field,
            )


def validate_repository(
    folder: str | os.PathLike,
    pipeline_class: type | None = None,
    passed_components: Iterable[str] = (),
    variant: str | None = None,
) -> None:
    """Check a LightBagel pipeline folder before loading it, raising `LightBagelRepositoryError` on the first fault.

    For every component not in `passed_components` it checks that:

    - its model_index.json entry and its folder exist,
    - the transformer's config.json has no field this package version does not know,
    - the transformer's and VAE's safetensors contain exactly the tensors, with the shapes, that their configs give
      (read from the file headers, so no weights are loaded),
    - the transformer's widths agree with the VLM's and the VAE's configs.
    """
    from diffusers import AutoencoderKLWan

    from .models.transformer_lightbagel import LightBagelTransformer2DModel

    folder = Path(folder)
    passed = set(passed_components)
    model_index = _read_json(folder, MODEL_INDEX_FILENAME)
    hint = _newer_repository_hint(model_index)

    class_name = model_index.get("_class_name")
    if isinstance(class_name, (list, tuple)) and len(class_name) == 2:
        class_name = class_name[1]
    if class_name not in PIPELINE_TASKS:
        raise LightBagelRepositoryError(
            f"{MODEL_INDEX_FILENAME} in {folder} names the pipeline {class_name!r} in _class_name; a LightBagel "
            f"repository names one of {sorted(PIPELINE_TASKS)}.{hint}",
            file=MODEL_INDEX_FILENAME,
            field="_class_name",
        )

    expected = [name for name in COMPONENT_NAMES if name not in passed]
    if pipeline_class is not None:
        signature_components = [name for name in inspect.signature(pipeline_class.__init__).parameters]
        expected = [name for name in expected if name in signature_components]
    for name in expected:
        entry = model_index.get(name)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
            raise LightBagelRepositoryError(
                f"{MODEL_INDEX_FILENAME} in {folder} has no [library, class] entry for the component {name!r}; "
                f"pass the component to from_pretrained ({name}=...) or add the entry.",
                file=MODEL_INDEX_FILENAME,
                field=name,
            )
        if not (folder / name).is_dir():
            raise LightBagelRepositoryError(
                f"The component folder {name}/ is missing from {folder}, although {MODEL_INDEX_FILENAME} lists "
                f"{name}; pass the component to from_pretrained ({name}=...) or restore the folder.",
                file=f"{name}/",
                field=name,
            )
    unknown_components = sorted(
        key for key, entry in model_index.items() if not key.startswith("_") and key not in COMPONENT_NAMES
    )
    if unknown_components:
        raise LightBagelRepositoryError(
            f"{MODEL_INDEX_FILENAME} in {folder} lists the component {unknown_components[0]!r}, which LightBagel "
            f"pipelines of {PIP_NAME} {_package_version()} do not have.{hint}",
            file=MODEL_INDEX_FILENAME,
            field=unknown_components[0],
        )

    transformer_config = vae_config = vlm_config = None
    if "transformer" in expected:
        transformer_config = _check_model_component(
            folder, "transformer", LightBagelTransformer2DModel, variant, strict_fields=True, hint=hint
        )
    if "vae" in expected:
        vae_config = _check_model_component(folder, "vae", AutoencoderKLWan, variant, strict_fields=False, hint=hint)
    if "vlm" in expected:
        vlm_config = _read_json(folder, "vlm/config.json")
    _check_consistency(transformer_config, vae_config, vlm_config)


# ---------------------------------------------------------------------------------------------------- the mixin
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

        Accepts every argument of `DiffusionPipeline.from_pretrained` (`torch_dtype`, `variant`, `device_map`,
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
                load it with `torch_dtype`.
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

        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
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
            if isinstance(module, torch.nn.Module) and module.dtype != expected:
                logger.warning(
                    f"variant={variant!r} only names the files; the {name} weights are {module.dtype} and are saved "
                    f"as such. Cast first (pipe.to({expected})) if the files should hold {expected} weights."
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
