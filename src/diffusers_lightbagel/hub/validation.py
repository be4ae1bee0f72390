"""The repository check that LightBagel pipelines run before loading any weight."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from packaging import version as packaging_version
from safetensors import safe_open

from diffusers.utils import logging

from .constants import (
    COMPONENT_NAMES,
    MODEL_INDEX_FILENAME,
    PIP_NAME,
    PIPELINE_TASKS,
    VERSION_KEY,
    _package_version,
)
from .files import _weight_file_pattern


logger = logging.get_logger(__name__)


class LightBagelRepositoryError(ValueError):
    """A LightBagel repository that cannot be loaded: a missing file, an unknown config field or mismatched shapes.

    `file` is the path, relative to the repository root, of the file at fault, and `field` is the config field or
    tensor name.
    """

    def __init__(self, message: str, file: str, field: str | None = None):
        super().__init__(message)
        self.file = file
        self.field = field



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


# Weight and index files of any variant, as diffusers and transformers name them: `model.bf16.safetensors`,
# `diffusion_pytorch_model.bf16-00001-of-00002.safetensors`, `diffusion_pytorch_model.safetensors.index.bf16.json`.
_VARIANT_WEIGHT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|model|pytorch_model)"
    r"(?:\.(?P<variant>[A-Za-z0-9_-]+)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"|\.(?:safetensors|bin)\.index\.(?P<index_variant>[A-Za-z0-9_-]+)\.json)$"
)
# Components whose folders contain weight files.
WEIGHT_COMPONENTS = ("vlm", "transformer", "vae")


def _check_weight_variant(folder: Path, component: str, variant: str | None) -> None:
    """Raise when a component folder only has weights of variants other than `variant`, naming the ones it has.

    diffusers would otherwise look for the plain file names and fail with "no file named
    diffusion_pytorch_model.bin found", which does not mention variants.
    """
    names = [path.name for path in (folder / component).iterdir() if path.is_file()]
    variants = set()
    for name in names:
        match = _VARIANT_WEIGHT_FILE.match(name)
        if match:
            variants.add(match.group("variant") or match.group("index_variant"))
    has_plain_weights = any(_weight_file_pattern(None).match(name) for name in names)
    if not variants or variant in variants or has_plain_weights:
        return

    available = sorted(variants)
    variant_list = ", ".join(repr(name) for name in available)
    if variant is None:
        problem = f"has only weights saved with a variant ({variant_list}) and no weights without one"
    else:
        problem = f"has no weights for variant={variant!r}, only for {variant_list}"
    raise LightBagelRepositoryError(
        f"The component folder {component}/ in {folder} {problem}; load it with "
        f"from_pretrained(..., variant={available[0]!r}).",
        file=f"{component}/",
        field=component,
    )


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
    - its folder has weights for `variant` (or, with `variant=None`, weights saved without a variant) when it has
      weights of some variant,
    - the transformer's config.json has no field this package version does not know,
    - the transformer's and VAE's safetensors contain exactly the tensors, with the shapes, that their configs give
      (read from the file headers, so no weights are loaded),
    - the transformer's widths agree with the VLM's and the VAE's configs.
    """
    from diffusers import AutoencoderKLWan

    from ..models.transformer_lightbagel import LightBagelTransformer2DModel

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

    for name in WEIGHT_COMPONENTS:
        if name in expected:
            _check_weight_variant(folder, name, variant)

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

