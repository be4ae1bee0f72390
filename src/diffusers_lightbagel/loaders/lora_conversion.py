"""Conversion of LoRA files from other trainers to the diffusers/PEFT layout of `LightBagelTransformer2DModel`.

Three layouts are read besides the native one (`transformer.<module>.lora_A.weight` / `lora_B.weight`):

- original Wan key names under `diffusion_model.` (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, with
  `lora_up`, `alpha` and `diff_b` keys), converted by diffusers' own Wan converter;
- kohya-style names: `lora_down` / `lora_up` / `alpha` on module paths written with dots or, after a `lora_unet_`
  prefix, with underscores (`lora_unet_blocks_0_self_attn_q.lora_down.weight`), in Wan or diffusers naming;
- PEFT's `PeftModel.save_pretrained` layout (`base_model.model.<module>.lora_A.weight`).

Every key must end up on a linear layer of the transformer with matching shapes: `check_lora_state_dict` lists
every key that does not, so no key is dropped without an error.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers


TRANSFORMER_PREFIX = "transformer."
WAN_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
PEFT_MODEL_PREFIX = "base_model.model."

PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
WAN_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha", "diff_b")

# Original Wan module names (as in the Wan2.2 repository's model code) and their diffusers names.
WAN_TO_DIFFUSERS_MODULES = (
    (r"blocks\.(\d+)\.self_attn\.q", r"blocks.\1.attn1.to_q"),
    (r"blocks\.(\d+)\.self_attn\.k", r"blocks.\1.attn1.to_k"),
    (r"blocks\.(\d+)\.self_attn\.v", r"blocks.\1.attn1.to_v"),
    (r"blocks\.(\d+)\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.q", r"blocks.\1.attn2.to_q"),
    (r"blocks\.(\d+)\.cross_attn\.k", r"blocks.\1.attn2.to_k"),
    (r"blocks\.(\d+)\.cross_attn\.v", r"blocks.\1.attn2.to_v"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.net.2"),
    (r"head\.head", "proj_out"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
)

# Parts of module names that contain an underscore themselves, so that `lora_unet_` names split back correctly.
UNDERSCORE_NAME_PARTS = (
    "fusion_blocks",
    "self_attn",
    "cross_attn",
    "condition_embedder",
    "text_embedder",
    "time_embedder",
    "time_proj",
    "time_projection",
    "text_embedding",
    "time_embedding",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "linear_1",
    "linear_2",
)


def _split_suffix(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def wan_to_diffusers_module(name: str) -> str | None:
    """Return the diffusers name of an original Wan module name, or None if the name is not a Wan module."""
    for pattern, replacement in WAN_TO_DIFFUSERS_MODULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def kohya_to_dotted_module(name: str) -> str:
    """Turn a kohya `lora_unet_` module name (dots written as underscores) back into a dotted module path."""
    parts = name.split("_")
    dotted: list[str] = []
    index = 0
    while index < len(parts):
        # Join the longest run of parts that forms a known underscore name, e.g. "fusion" + "blocks".
        for length in (3, 2):
            candidate = "_".join(parts[index : index + length])
            if len(parts) - index >= length and candidate in UNDERSCORE_NAME_PARTS:
                dotted.append(candidate)
                index += length
                break
        else:
            dotted.append(parts[index])
            index += 1
    return ".".join(dotted)


def _lora_key_format(key: str) -> str:
    if key.startswith(WAN_PREFIX):
        return "wan"
    if key.startswith(KOHYA_PREFIX) or _split_suffix(key, KOHYA_SUFFIXES) is not None:
        return "kohya"
    return "peft"


def _convert_wan_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check that every key names a Wan module with a LoRA suffix, then convert with diffusers' Wan converter."""
    unsupported = []
    modules_with_factors = set()
    for key in state_dict:
        split = _split_suffix(key[len(WAN_PREFIX) :], WAN_SUFFIXES)
        if split is None or wan_to_diffusers_module(split[0]) is None:
            unsupported.append(key)
        elif split[1] in ("lora_down.weight", "lora_A.weight"):
            modules_with_factors.add(split[0])
    # diffusers drops bias differences of modules without LoRA factors (norms, some distillation files); reject them.
    unsupported += [
        key
        for key in state_dict
        if key.endswith(".diff_b") and key[len(WAN_PREFIX) : -len(".diff_b")] not in modules_with_factors
    ]
    if unsupported:
        raise ValueError(
            f"The LoRA file uses original Wan key names, but {len(unsupported)} keys match no LoRA factor of a Wan "
            f"linear layer: {sorted(unsupported)}. Supported are lora_down/lora_up (or lora_A/lora_B), alpha and "
            "diff_b keys on the attention, feed-forward, embedding and head layers."
        )
    try:
        return _convert_non_diffusers_wan_lora_to_diffusers(dict(state_dict))
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"Converting the Wan-format LoRA file failed: {error!r}. Check that every lora_down key has its lora_up "
            "key."
        ) from error


def _convert_kohya_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename kohya-style keys to PEFT names and fold each `alpha / rank` scale into the down factor."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, value in state_dict.items():
        split = _split_suffix(key, KOHYA_SUFFIXES)
        if split is None:
            unmatched.append(key)
            continue
        module, suffix = split
        if module.startswith(KOHYA_PREFIX):
            module = kohya_to_dotted_module(module[len(KOHYA_PREFIX) :])
        module = module.removeprefix(TRANSFORMER_PREFIX)
        module = wan_to_diffusers_module(module) or module
        factors.setdefault(module, {})[suffix] = value
        factors[module].setdefault("keys", []).append(key)

    converted = {}
    for module, entry in factors.items():
        if "lora_down.weight" not in entry or "lora_up.weight" not in entry:
            unmatched += entry["keys"]
            continue
        down, up = entry["lora_down.weight"], entry["lora_up.weight"]
        if "alpha" in entry:
            rank = down.shape[0]
            down = down * (float(entry["alpha"]) / rank)
        converted[f"{TRANSFORMER_PREFIX}{module}.lora_A.weight"] = down
        converted[f"{TRANSFORMER_PREFIX}{module}.lora_B.weight"] = up
    if unmatched:
        raise ValueError(
            f"The LoRA file uses kohya-style names, but {len(unmatched)} keys are not a complete lora_down/lora_up "
            f"pair (with an optional alpha): {sorted(unmatched)}."
        )
    return converted


def _convert_peft_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(PEFT_MODEL_PREFIX):
            key = TRANSFORMER_PREFIX + key[len(PEFT_MODEL_PREFIX) :]
        elif "." in key and key.split(".", 1)[0] in ("blocks", "fusion_blocks", "condition_embedder", "proj_out"):
            # Saved from the model itself (PeftAdapterMixin.save_lora_adapter) with no component prefix.
            key = TRANSFORMER_PREFIX + key
        converted[key] = value
    return converted


def convert_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `state_dict` in the diffusers layout, `transformer.<module>.lora_A.weight` / `lora_B.weight`.

    The layout is detected from the key names; a file that mixes layouts is rejected with the keys of each.
    """
    formats: dict[str, list[str]] = {}
    for key in state_dict:
        formats.setdefault(_lora_key_format(key), []).append(key)
    if len(formats) > 1:
        examples = {name: sorted(keys)[:5] for name, keys in formats.items()}
        raise ValueError(f"The LoRA file mixes key layouts ({sorted(formats)}); for example {examples}.")
    if "wan" in formats:
        return _convert_wan_lora(state_dict)
    if "kohya" in formats:
        return _convert_kohya_lora(state_dict)
    return _convert_peft_lora(state_dict)


def _base_linear(module: nn.Module) -> nn.Module:
    # A layer that already has an adapter is a PEFT LoraLayer wrapping the original layer.
    return getattr(module, "base_layer", module)


def check_lora_state_dict(state_dict: dict[str, torch.Tensor], transformer: nn.Module) -> None:
    """Raise a `ValueError` listing every key that is not a LoRA factor of a linear layer of `transformer`.

    Checked per key: the `transformer.` prefix, a `lora_A.weight` / `lora_B.weight` / `lora_B.bias` suffix, a module
    of that name that is an `nn.Linear`, the factor shapes `(rank, in_features)` and `(out_features, rank)`, and that
    both factors are present with the same rank.
    """
    if not state_dict:
        raise ValueError("The LoRA file contains no weights.")
    modules = dict(transformer.named_modules())
    problems: list[str] = []
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(TRANSFORMER_PREFIX):
            problems.append(f"{key}: not a transformer weight (LightBagel LoRA files hold transformer layers only)")
            continue
        split = _split_suffix(key[len(TRANSFORMER_PREFIX) :], PEFT_SUFFIXES)
        if split is None:
            problems.append(f"{key}: not a LoRA factor (expected a suffix among {list(PEFT_SUFFIXES)})")
            continue
        module_name, suffix = split
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{key}: the transformer has no module {module_name!r}")
            continue
        if not isinstance(_base_linear(module), nn.Linear):
            problems.append(f"{key}: {module_name!r} is a {type(_base_linear(module)).__name__}, not a linear layer")
            continue
        factors.setdefault(module_name, {})[suffix] = value

    for module_name, entry in factors.items():
        linear = _base_linear(modules[module_name])
        key = f"{TRANSFORMER_PREFIX}{module_name}"
        down, up = entry.get("lora_A.weight"), entry.get("lora_B.weight")
        if down is None or up is None:
            missing = "lora_A.weight" if down is None else "lora_B.weight"
            problems.append(f"{key}: {missing} is missing")
            continue
        rank = down.shape[0]
        if tuple(down.shape) != (rank, linear.in_features):
            problems.append(f"{key}.lora_A.weight: shape {tuple(down.shape)}, expected ({rank}, {linear.in_features})")
        if tuple(up.shape) != (linear.out_features, rank):
            problems.append(f"{key}.lora_B.weight: shape {tuple(up.shape)}, expected ({linear.out_features}, {rank})")
        bias = entry.get("lora_B.bias")
        if bias is not None and tuple(bias.shape) != (linear.out_features,):
            problems.append(f"{key}.lora_B.bias: shape {tuple(bias.shape)}, expected ({linear.out_features},)")

    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(
            f"The LoRA file does not fit this LightBagel transformer; {len(problems)} keys are invalid:\n  {listing}"
        )
