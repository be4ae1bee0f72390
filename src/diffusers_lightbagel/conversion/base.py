"""Building an initial LightBagel pipeline folder from Qwen2.5-VL and Wan2.2-TI2V-5B.

The result computes what the two base models compute: the fusion blocks start zero-initialised, every Wan DiT weight
is copied unchanged except the input layer of the text projection, which now reads VLM hidden states and is
re-initialised.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging

from ..models.transformer_lightbagel import LightBagelTransformer2DModel
from .key_maps import (
    WAN22_ORIGINAL_VAE,
    WAN_DIFFUSERS_TRANSFORMER,
    WAN_DIFFUSERS_VAE,
    WAN_ORIGINAL_TRANSFORMER,
    ConversionError,
    KeyMap,
    KeyReport,
    build_target_state_dict,
)
from .loaders import WEIGHT_SUFFIXES, load_sharded, load_state_dict_from_folder, load_weights_file
from .writer import (
    ConversionReport,
    atomic_output_folder,
    cast_model,
    check_output_path,
    describe_component,
    most_common_float_dtype,
    validate_variant,
)


logger = logging.get_logger(__name__)

DEFAULT_SCHEDULER_SHIFT = 3.0
# WanTransformer3DModel config fields that LightBagelTransformer2DModel takes unchanged.
SHARED_TRANSFORMER_FIELDS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "rope_max_seq_len",
)
# WanTransformer3DModel options for image conditioning (Wan2.1 I2V/FLF2V), which LightBagel has no counterpart for.
IMAGE_CONDITIONING_FIELDS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
ORIGINAL_WAN_MODEL_TYPES = ("t2v", "ti2v")
ORIGINAL_VAE_FILE_NAMES = ("Wan2.2_VAE.pth", "Wan2.2_VAE.safetensors")


@dataclass
class WeightsSource:
    """One component's weights: where they are, how to read them, and which key map renames them."""

    path: Path
    key_map: KeyMap
    config: dict
    load: Callable[[], dict]


def _read_json(path: Path, description: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read the {description} {path}: {error}.") from error


def _load_flat(path: Path) -> dict:
    if path.is_dir():
        state_dict = load_state_dict_from_folder(path)
    elif path.name.endswith(".index.json"):
        state_dict = load_sharded(path)
    else:
        state_dict = load_weights_file(path)
    if not state_dict or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ConversionError(f"{path} is not a flat state dict of tensors.")
    return state_dict


def wan_config_from_original(original: dict, source: Path) -> dict:
    """Translate a Wan release `config.json` (`dim`, `num_heads`, `in_dim`, ...) to WanTransformer3DModel fields."""
    model_type = original.get("model_type", "t2v")
    if model_type not in ORIGINAL_WAN_MODEL_TYPES:
        raise ConversionError(
            f"{source} describes a Wan {model_type!r} model; only {ORIGINAL_WAN_MODEL_TYPES} (no image encoder "
            "branch) can become a LightBagel transformer."
        )
    required = ("dim", "num_heads", "ffn_dim", "freq_dim", "num_layers", "in_dim", "out_dim")
    absent = [name for name in required if name not in original]
    if absent:
        raise ConversionError(f"The Wan config {source} lacks {absent}; expected the config.json of a Wan release.")
    dim, num_heads = int(original["dim"]), int(original["num_heads"])
    if dim % num_heads:
        raise ConversionError(f"The Wan config {source} has dim={dim}, not divisible by num_heads={num_heads}.")
    return {
        "patch_size": tuple(original.get("patch_size", (1, 2, 2))),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": int(original["in_dim"]),
        "out_channels": int(original["out_dim"]),
        "freq_dim": int(original["freq_dim"]),
        "ffn_dim": int(original["ffn_dim"]),
        "num_layers": int(original["num_layers"]),
        "cross_attn_norm": bool(original.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if original.get("qk_norm", True) else None,
        "eps": float(original.get("eps", 1e-6)),
    }


def resolve_wan_transformer(wan: Path, wan_config: Path | None) -> WeightsSource:
    """Find the Wan DiT weights and config in a diffusers pipeline/transformer folder or a Wan release layout."""
    if not wan.exists():
        raise ConversionError(f"The Wan source {wan} does not exist.")
    folder = wan
    if wan.is_dir() and (wan / "transformer").is_dir():
        folder = wan / "transformer"

    if folder.is_dir() and (folder / "config.json").is_file():
        config = _read_json(folder / "config.json", "Wan config")
        if config.get("_class_name") == "WanTransformer3DModel":
            return WeightsSource(folder, WAN_DIFFUSERS_TRANSFORMER, config, lambda: _load_flat(folder))
        if "dim" in config and "num_heads" in config:
            index = sorted(folder.glob("*.safetensors.index.json"))
            if not index and not (folder / "diffusion_pytorch_model.safetensors").is_file():
                raise ConversionError(
                    f"{folder} has a Wan release config.json but no diffusion_pytorch_model*.safetensors weights."
                )
            weights = index[0] if index else folder / "diffusion_pytorch_model.safetensors"
            config = wan_config_from_original(config, folder)
            return WeightsSource(folder, WAN_ORIGINAL_TRANSFORMER, config, lambda: _load_flat(weights))
        raise ConversionError(
            f"{folder / 'config.json'} is neither a diffusers WanTransformer3DModel config (_class_name) nor a Wan "
            f"release config (dim, num_heads); its _class_name is {config.get('_class_name')!r}."
        )

    if wan.is_file() and (wan.name.endswith(".index.json") or wan.name.endswith(WEIGHT_SUFFIXES)):
        config_path = wan_config or wan.parent / "config.json"
        if not config_path.is_file():
            raise ConversionError(
                f"{wan} is a Wan weights file without a config: pass --wan-config with the config.json of the Wan "
                "release (it sets num_heads, which the weights do not show)."
            )
        original = _read_json(config_path, "Wan config")
        config = wan_config_from_original(original, config_path)
        return WeightsSource(wan, WAN_ORIGINAL_TRANSFORMER, config, lambda: _load_flat(wan))

    raise ConversionError(
        f"Cannot find Wan DiT weights in {wan}: expected a diffusers Wan pipeline folder, a diffusers transformer "
        "folder, a Wan release folder (config.json with dim/num_heads), or a weights file "
        f"({', '.join(WEIGHT_SUFFIXES)})."
    )


def resolve_wan_vae(wan: Path, wan_vae: Path | None, vae_config: Path | None) -> WeightsSource:
    """Find the Wan2.2 VAE: `--wan-vae` if given, else `vae/` or the release VAE file next to the DiT."""
    candidates = [wan_vae] if wan_vae is not None else []
    if wan_vae is None and wan.is_dir():
        candidates += [wan / "vae"] + [wan / name for name in ORIGINAL_VAE_FILE_NAMES]
    source = next((path for path in candidates if path.exists()), None)
    if source is None:
        raise ConversionError(
            f"No Wan VAE found (looked at {[str(path) for path in candidates] or 'nothing'}); pass --wan-vae with a "
            f"diffusers AutoencoderKLWan folder or the Wan2.2 release VAE file."
        )

    if source.is_dir():
        config = _read_json(source / "config.json", "VAE config")
        if config.get("_class_name") != "AutoencoderKLWan":
            raise ConversionError(
                f"{source} contains a {config.get('_class_name')!r}, expected an AutoencoderKLWan folder."
            )
        return WeightsSource(source, WAN_DIFFUSERS_VAE, config, lambda: _load_flat(source))

    if vae_config is None:
        raise ConversionError(
            f"{source} is a Wan release VAE file, which stores no configuration: pass --vae-config with a diffusers "
            "AutoencoderKLWan config.json (the `vae/config.json` of Wan-AI/Wan2.2-TI2V-5B-Diffusers has the "
            "latent statistics this file lacks)."
        )
    config = _read_json(vae_config, "VAE config")
    return WeightsSource(source, WAN22_ORIGINAL_VAE, config, lambda: _load_flat(source))


def lightbagel_transformer_config(wan_config: dict, vlm_text_config, fusion_depth: float) -> dict:
    """Return the LightBagelTransformer2DModel config for a Wan DiT joined to a VLM."""
    image_fields = {name: wan_config[name] for name in IMAGE_CONDITIONING_FIELDS if wan_config.get(name) is not None}
    if image_fields:
        raise ConversionError(
            f"The Wan transformer has image conditioning ({image_fields}); LightBagel builds on the text-to-video "
            "DiT (Wan2.2-TI2V-5B), which has none."
        )
    config = {name: wan_config[name] for name in SHARED_TRANSFORMER_FIELDS if name in wan_config}
    config["patch_size"] = tuple(config.get("patch_size", (1, 2, 2)))
    config.update(
        text_dim=vlm_text_config.hidden_size,
        vlm_hidden_size=vlm_text_config.hidden_size,
        vlm_num_layers=vlm_text_config.num_hidden_layers,
        fusion_depth=fusion_depth,
    )
    return config


@contextmanager
def _default_dtype(dtype: torch.dtype):
    # Building a model in its final dtype avoids a float32 copy of every weight, about 28 GB for the 7B transformer.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fill_model(model_cls, config: dict, source: WeightsSource, dtype: torch.dtype | None, seed: int):
    """Build `model_cls(**config)` in `dtype` and load the mapped source weights into it.

    Parameters the key map re-initialises keep the model's own initialisation, drawn after `torch.manual_seed(seed)`.
    Returns the model and its key report.
    """
    state_dict = source.load()
    dtype = dtype or most_common_float_dtype(state_dict)
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        model = model_cls.from_config(config)
    target, report = build_target_state_dict(state_dict, source.key_map, model.state_dict())
    model.load_state_dict(target, strict=True)
    return cast_model(model, dtype).eval(), report


def load_vlm(vlm: Path, dtype: torch.dtype | None):
    """Load Qwen2.5-VL and its processor from a transformers folder, checking the model type first."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    if not (vlm / "config.json").is_file():
        raise ConversionError(f"{vlm} is not a transformers model folder (no config.json).")
    config = AutoConfig.from_pretrained(vlm)
    if config.model_type != "qwen2_5_vl":
        raise ConversionError(
            f"{vlm} contains a {config.model_type!r} model, but LightBagel needs Qwen2.5-VL (qwen2_5_vl)."
        )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm, dtype=dtype or "auto").eval()
    try:
        processor = Qwen2_5_VLProcessor.from_pretrained(vlm)
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot load the Qwen2.5-VL processor from {vlm}: {error}.") from error
    return model, processor


def convert_base_models(
    vlm: str | Path,
    wan: str | Path,
    output: str | Path,
    *,
    wan_vae: str | Path | None = None,
    wan_config: str | Path | None = None,
    vae_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    vlm_dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    fusion_depth: float = 0.0,
    seed: int = 0,
    variant: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Write an initial LightBagel pipeline folder from Qwen2.5-VL and a Wan2.2 DiT and VAE.

    Args:
        vlm: transformers Qwen2.5-VL folder; its processor files must be in the same folder.
        wan: a diffusers Wan pipeline folder, a diffusers `transformer/` folder, a Wan release folder, or a Wan
            release weights file (with `wan_config`).
        wan_vae: the VAE, when `wan` does not hold it: a diffusers AutoencoderKLWan folder or `Wan2.2_VAE.pth`.
        wan_config, vae_config: configs for release files that carry none (see `resolve_wan_transformer`).
        dtype, vlm_dtype, vae_dtype: dtypes of the transformer, VLM and VAE; None keeps each source's dtype.
        fusion_depth: which VLM layers the fusion blocks read, 0 (paired by relative depth) to 1 (last layer).
        seed: seed of the re-initialised parameters.
        variant: saves weights as `<name>.<variant>.safetensors`, loaded with `from_pretrained(..., variant=...)`.
    """
    vlm, wan, output = Path(vlm), Path(wan), Path(output)
    validate_variant(variant)
    check_output_path(output, overwrite)
    if not 0.0 <= fusion_depth <= 1.0:
        raise ConversionError(f"fusion_depth must be in [0, 1]; got {fusion_depth}.")
    transformer_source = resolve_wan_transformer(wan, Path(wan_config) if wan_config else None)
    vae_source = resolve_wan_vae(wan, Path(wan_vae) if wan_vae else None, Path(vae_config) if vae_config else None)
    logger.info(f"Wan DiT: {transformer_source.path} ({transformer_source.key_map.name})")
    logger.info(f"Wan VAE: {vae_source.path} ({vae_source.key_map.name})")

    vlm_model, processor = load_vlm(vlm, vlm_dtype)
    transformer_config = lightbagel_transformer_config(
        transformer_source.config, vlm_model.config.get_text_config(), fusion_depth
    )
    transformer, transformer_keys = fill_model(
        LightBagelTransformer2DModel, transformer_config, transformer_source, dtype, seed
    )
    vae, vae_keys = fill_model(AutoencoderKLWan, vae_source.config, vae_source, vae_dtype, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=DEFAULT_SCHEDULER_SHIFT)

    components = {
        "vlm": vlm_model,
        "processor": processor,
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
    }
    return write_pipeline(components, output, {"transformer": transformer_keys, "vae": vae_keys}, variant, overwrite)


def write_pipeline(
    components: dict, output: Path, keys: dict[str, KeyReport], variant: str | None, overwrite: bool, pipeline_cls=None
) -> ConversionReport:
    """Save a LightBagel pipeline made of `components` to `output` atomically and return the report."""
    from ..pipelines import LightBagelPipeline

    pipeline = (pipeline_cls or LightBagelPipeline)(**components)
    with atomic_output_folder(output, overwrite) as temporary:
        pipeline.save_pretrained(temporary, safe_serialization=True, variant=variant)

    report = ConversionReport(output=output, keys=keys)
    for name in ("vlm", "processor", "transformer", "vae", "scheduler"):
        report.components.append(describe_component(name, components[name]))
    if variant:
        report.notes.append(
            f"weights saved as variant {variant!r}: load with from_pretrained(..., variant={variant!r})"
        )
    for component in report.components:
        if component.num_parameters:
            logger.info(
                f"{component.name}: {component.class_name}, {component.num_parameters:,} parameters, "
                f"{component.dtypes}"
            )
    for name, key_report in keys.items():
        for key, reason in key_report.dropped.items():
            logger.info(f"{name}: dropped source key {key} ({reason})")
    return report
