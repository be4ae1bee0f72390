"""Turning a LightBagel training checkpoint into a pipeline folder, with the VLM, VAE and configs of a base folder."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusers import DiffusionPipeline
from diffusers.utils import logging

from ..models.transformer_lightbagel import LightBagelTransformer2DModel
from .base import write_pipeline
from .key_maps import (
    LIGHTBAGEL_FULL_CHECKPOINT,
    LIGHTBAGEL_FUSION_ONLY_CHECKPOINT,
    ConversionError,
    KeyMap,
    build_target_state_dict,
    strip_key_prefixes,
)
from .loaders import load_training_checkpoint
from .writer import ConversionReport, cast_model, check_output_path, most_common_float_dtype, validate_variant


logger = logging.get_logger(__name__)

CHECKPOINT_LAYOUTS = ("auto", "full", "fusion-only")
# Keys a fusion-only checkpoint may hold: the parameters that are new or re-initialised in LightBagel.
_FUSION_ONLY_PREFIXES = ("fusion_blocks.", "condition_embedder.text_embedder.")


def choose_checkpoint_key_map(state_dict: dict, layout: str, strip_prefixes: tuple[str, ...]) -> KeyMap:
    """Return the key map for `layout`; "auto" picks fusion-only when every key is a fusion or text-projection key."""
    if layout not in CHECKPOINT_LAYOUTS:
        raise ConversionError(f"Invalid --layout {layout!r}; allowed: {', '.join(CHECKPOINT_LAYOUTS)}.")
    if layout == "full":
        key_map = LIGHTBAGEL_FULL_CHECKPOINT
    elif layout == "fusion-only":
        key_map = LIGHTBAGEL_FUSION_ONLY_CHECKPOINT
    else:
        all_prefixes = LIGHTBAGEL_FULL_CHECKPOINT.strip_prefixes + tuple(strip_prefixes)
        keys = [strip_key_prefixes(key, all_prefixes) for key in state_dict]
        fusion_only = all(key.startswith(_FUSION_ONLY_PREFIXES) for key in keys)
        key_map = LIGHTBAGEL_FUSION_ONLY_CHECKPOINT if fusion_only else LIGHTBAGEL_FULL_CHECKPOINT
    return key_map.with_extra_prefixes(tuple(strip_prefixes))


def convert_training_checkpoint(
    base: str | Path,
    checkpoint: str | Path,
    output: str | Path,
    *,
    use_ema: bool = False,
    dtype: torch.dtype | None = None,
    strip_prefixes: tuple[str, ...] | list[str] = (),
    layout: str = "auto",
    variant: str | None = None,
    base_variant: str | None = None,
    deepspeed_tag: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Write a LightBagel pipeline folder whose transformer contains the weights of a training checkpoint.

    Args:
        base: a LightBagel pipeline folder, e.g. the output of `convert_base_models`. It provides the VLM,
            processor, VAE, scheduler and transformer config. For a fusion-only checkpoint it also provides every
            transformer weight the checkpoint lacks.
        checkpoint: see `load_training_checkpoint` for the layouts.
        use_ema: convert the EMA weights stored in the checkpoint instead of the raw ones.
        dtype: transformer dtype; None keeps the checkpoint's dtype (full) or the base transformer's (fusion-only).
        strip_prefixes: wrapper prefixes to remove besides `module.` and `_orig_mod.`, e.g. ("model.",).
        layout: "full", "fusion-only", or "auto" (fusion-only when every key is a fusion block or text projection key).
        variant: saves weights as `<name>.<variant>.safetensors`.
        base_variant: variant of the base folder's weights, if it was saved with one.
        deepspeed_tag: checkpoint tag inside a DeepSpeed folder; default the one in its `latest` file.
    """
    base, checkpoint, output = Path(base), Path(checkpoint), Path(output)
    validate_variant(variant)
    check_output_path(output, overwrite)
    if not (base / "model_index.json").is_file() or not (base / "transformer").is_dir():
        raise ConversionError(
            f"The base {base} is not a LightBagel pipeline folder (model_index.json and transformer/ expected); "
            "create one with `lightbagel convert base`."
        )
    if layout not in CHECKPOINT_LAYOUTS:
        raise ConversionError(f"Invalid --layout {layout!r}; allowed: {', '.join(CHECKPOINT_LAYOUTS)}.")

    loaded = load_training_checkpoint(checkpoint, use_ema=use_ema, deepspeed_tag=deepspeed_tag)
    key_map = choose_checkpoint_key_map(loaded.state_dict, layout, tuple(strip_prefixes))
    logger.info(
        f"Checkpoint {checkpoint}: {loaded.layout} layout, {len(loaded.state_dict)} tensors, {key_map.name} keys"
    )

    transformer = LightBagelTransformer2DModel.from_pretrained(base, subfolder="transformer", variant=base_variant)
    base_state_dict = transformer.state_dict()
    if dtype is None:
        dtype = base_state_dict_dtype = most_common_float_dtype(base_state_dict)
        if key_map.name == LIGHTBAGEL_FULL_CHECKPOINT.name:
            dtype = most_common_float_dtype(loaded.state_dict)
        logger.info(f"Transformer dtype: {dtype} (base transformer: {base_state_dict_dtype})")

    # The base transformer's state dict is the target: it has every key and shape the checkpoint must fill.
    target, key_report = build_target_state_dict(
        loaded.state_dict, key_map, base_state_dict, base_state_dict=base_state_dict if key_map.from_base else None
    )
    key_report.dropped.update(loaded.dropped)
    transformer.load_state_dict(target, strict=True)
    transformer = cast_model(transformer, dtype).eval()
    del target, base_state_dict

    base_pipeline = DiffusionPipeline.from_pretrained(base, transformer=transformer, variant=base_variant)
    names = ("vlm", "processor", "transformer", "vae", "scheduler")
    components = {name: getattr(base_pipeline, name) for name in names}
    return write_pipeline(
        components, output, {"transformer": key_report}, variant, overwrite, pipeline_cls=type(base_pipeline)
    )

