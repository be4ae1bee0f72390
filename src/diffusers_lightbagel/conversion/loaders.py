"""Reading state dicts from the file and folder layouts the conversion accepts.

Pickle-based files (`.pt`, `.pth`, `.bin`) are read with `torch.load(weights_only=True)`, which loads tensors and
plain containers and never runs code stored in the file. DeepSpeed ZeRO folders are the one exception: they are
consolidated by DeepSpeed's own helper, which unpickles DeepSpeed's files itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffusers.utils import logging

from .key_maps import ConversionError


logger = logging.get_logger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# Names under which a training script may nest the model's or the EMA model's state dict in a torch file.
STATE_DICT_CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "transformer")
EMA_CONTAINERS = ("ema", "ema_state_dict", "ema_model", "model_ema")
EMA_KEY_PREFIXES = ("ema.", "ema_model.", "model_ema.")
# Weight files that an accelerate `save_state` folder or a diffusers model folder holds, in order of preference.
MODEL_FILE_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)


@dataclass
class LoadedCheckpoint:
    """A flat state dict and what was left out while selecting it."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    dropped: dict[str, str] = field(default_factory=dict)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(
            f"Cannot read the safetensors file {path}: {error}. The file may be truncated."
        ) from error


def _load_pickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError or EOFError depending on the damage.
        raise ConversionError(
            f"Cannot read {path} with torch.load(weights_only=True): {error}. The file may be truncated, or it "
            "stores Python objects other than tensors and plain containers, which are not loaded."
        ) from error


def load_weights_file(path: Path) -> dict:
    """Load one weights file; a pickle file may return a nested dict."""
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise ConversionError(f"Unsupported weights file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}.")


def load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """Load every shard named in a `*.index.json` weight map and check that each shard contains its listed keys."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConversionError(
            f"Cannot read the shard index {index_path}: {error}. Expected a JSON object with a `weight_map`."
        ) from error

    state_dict: dict[str, torch.Tensor] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard_name
        if not shard_path.is_file():
            raise ConversionError(f"The shard {shard_path} listed in {index_path} does not exist.")
        shard = load_weights_file(shard_path)
        if not all(isinstance(value, torch.Tensor) for value in shard.values()):
            raise ConversionError(f"The shard {shard_path} is not a flat state dict of tensors.")
        state_dict.update(shard)
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise ConversionError(f"{len(absent)} keys listed in {index_path} are in no shard: {absent[:10]}.")
    return state_dict


def _find_index(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if len(indexes) > 1:
        names = [index.name for index in indexes]
        raise ConversionError(f"{folder} contains several shard indexes {names}; pass one of them.")
    return indexes[0] if indexes else None


def load_state_dict_from_folder(folder: Path, names: tuple[str, ...] = MODEL_FILE_NAMES) -> dict:
    """Load a diffusers/transformers-style weights folder: a shard index, or one of `names`."""
    index = _find_index(folder)
    if index is not None:
        return load_sharded(index)
    for name in names:
        if (folder / name).is_file():
            return load_weights_file(folder / name)
    raise ConversionError(f"No weights found in {folder}: expected a *.index.json or one of {', '.join(names)}.")


def find_deepspeed_folder(folder: Path) -> Path | None:
    """Return the folder holding a DeepSpeed ZeRO checkpoint (a `latest` tag file or `global_step*/`), if any."""
    for candidate in (folder, folder / "pytorch_model"):
        if not candidate.is_dir():
            continue
        if (candidate / "latest").is_file() or any(candidate.glob("global_step*/*model_states.pt")):
            return candidate
    return None


def load_deepspeed(folder: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Consolidate a DeepSpeed ZeRO checkpoint into one fp32 state dict with DeepSpeed's own helper."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise ConversionError(
            f"{folder} is a DeepSpeed ZeRO checkpoint; consolidating it needs DeepSpeed, which is not installed. "
            "Run `pip install deepspeed`, or consolidate it first with the `zero_to_fp32.py` script that DeepSpeed "
            "writes into the checkpoint folder and pass the resulting file."
        ) from error
    # NOTE: this call is not covered by the tests, which run without DeepSpeed; only the ImportError branch is.
    logger.warning(f"Consolidating the DeepSpeed checkpoint {folder} with DeepSpeed, which unpickles its own files.")
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


def _is_flat_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(item, torch.Tensor) for item in value.values())


def select_state_dict(loaded: dict, source: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Pick the model (or EMA) state dict out of a loaded checkpoint.

    Accepts a flat dict of tensors, or a dict nesting it under a known container name (`state_dict`, `model`,
    `ema`, ...). EMA weights are either such a container or keys prefixed `ema.`/`ema_model.`/`model_ema.`.
    Returns the flat state dict and the top-level keys left out, with reasons.
    """
    if not isinstance(loaded, dict):
        raise ConversionError(f"{source} contains a {type(loaded).__name__}, expected a dict of tensors.")
    dropped: dict[str, str] = {}

    containers = EMA_CONTAINERS if use_ema else STATE_DICT_CONTAINERS
    nested = [name for name in containers if _is_flat_state_dict(loaded.get(name))]
    if nested and not _is_flat_state_dict(loaded):
        chosen = nested[0]
        for key in loaded:
            if key != chosen:
                dropped[key] = f"checkpoint entry other than the selected {chosen!r}"
        state_dict = loaded[chosen]
    else:
        state_dict = {}
        for key, value in loaded.items():
            if isinstance(value, torch.Tensor):
                state_dict[key] = value
            else:
                dropped[key] = f"not a tensor ({type(value).__name__})"

    ema_keys = [key for key in state_dict if key.startswith(EMA_KEY_PREFIXES)]
    if use_ema and not nested:
        if not ema_keys:
            raise ConversionError(
                f"--ema was given but {source} has no EMA weights: no entry named one of {list(EMA_CONTAINERS)} "
                f"and no keys starting with {list(EMA_KEY_PREFIXES)}. Top-level entries: {sorted(loaded)[:10]}."
            )
        selected = {}
        for key, value in state_dict.items():
            prefix = next((prefix for prefix in EMA_KEY_PREFIXES if key.startswith(prefix)), None)
            if prefix is None:
                dropped[key] = "non-EMA weight (--ema selects the EMA weights)"
            else:
                selected[key[len(prefix) :]] = value
        state_dict = selected
    elif ema_keys:
        for key in ema_keys:
            dropped[key] = "EMA weight (pass --ema to convert the EMA weights instead)"
        state_dict = {key: value for key, value in state_dict.items() if key not in dropped}

    if not state_dict:
        raise ConversionError(f"{source} contains no tensors to convert.")
    return state_dict, dropped


def load_training_checkpoint(path: Path, use_ema: bool = False, deepspeed_tag: str | None = None) -> LoadedCheckpoint:
    """Load a training checkpoint from any supported layout.

    Layouts: one `.safetensors`/`.pt`/`.bin` file, a shard index (`*.index.json`) or a folder holding one, an
    accelerate `save_state` folder (`model.safetensors` or `pytorch_model.bin` inside), and a DeepSpeed ZeRO folder.
    """
    if not path.exists():
        raise ConversionError(f"The checkpoint {path} does not exist.")

    if path.is_file():
        if path.name.endswith(".index.json"):
            return _finish(load_sharded(path), path, "sharded", use_ema)
        return _finish(load_weights_file(path), path, "single-file", use_ema)

    deepspeed_folder = find_deepspeed_folder(path)
    if deepspeed_folder is not None:
        return _finish(load_deepspeed(deepspeed_folder, deepspeed_tag), path, "deepspeed-zero", use_ema)
    index = _find_index(path)
    if index is not None:
        return _finish(load_sharded(index), path, "sharded", use_ema)
    candidates = [path / name for name in MODEL_FILE_NAMES if (path / name).is_file()]
    if not candidates:
        raise ConversionError(
            f"{path} is not a supported checkpoint folder: expected a shard index (*.index.json), an accelerate "
            f"save_state folder with one of {', '.join(MODEL_FILE_NAMES)}, or a DeepSpeed ZeRO folder "
            "(a `latest` file or global_step*/ inside)."
        )
    return _finish(load_weights_file(candidates[0]), path, "accelerate-folder", use_ema)


def _finish(loaded: dict, source: Path, layout: str, use_ema: bool) -> LoadedCheckpoint:
    state_dict, dropped = select_state_dict(loaded, source, use_ema)
    return LoadedCheckpoint(state_dict=state_dict, layout=layout, dropped=dropped)
