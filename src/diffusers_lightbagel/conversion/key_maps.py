"""Declarative key maps, one per source layout, and the code that applies them.

A `KeyMap` describes how the parameter names of one source layout become the names of a target model. It lists
wrapper prefixes to strip, an optional whole-dict converter from diffusers, and regex renames. It also lists source
keys dropped on purpose, target keys re-initialised on purpose, and target keys that may come from a base model.
Supporting a new layout means writing a new table here, not new code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers


class ConversionError(ValueError):
    """A source that cannot be converted: unreadable, incomplete, or not matching the target model."""


@dataclass(frozen=True)
class KeyMap:
    """Rules that map one source layout's state dict onto a target model's parameter names.

    Attributes:
        name: short identifier shown in reports, e.g. "wan-original-transformer".
        description: one line on which files use this layout.
        strip_prefixes: prefixes removed from the start of every key, repeatedly and in any order
            (`module._orig_mod.x` loses both).
        converter: a function taking and returning a whole state dict, applied after prefix stripping; used where
            diffusers already ships the conversion for a layout.
        renames: (regex, replacement) pairs applied in order to every key with `re.sub`.
        dropped: (regex, reason) pairs matched against the stripped source key; a match is left out on purpose and
            listed in the report.
        reinitialised: (regex, reason) pairs matched against target keys; those parameters keep the target model's
            fresh initialisation even when the source has a tensor for them.
        from_base: regexes of target keys that are taken from a base model when the source lacks them.
    """

    name: str
    description: str
    strip_prefixes: tuple[str, ...] = ()
    converter: Callable[[dict], dict] | None = None
    renames: tuple[tuple[str, str], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    reinitialised: tuple[tuple[str, str], ...] = ()
    from_base: tuple[str, ...] = ()

    def with_extra_prefixes(self, prefixes: tuple[str, ...] | list[str]) -> "KeyMap":
        extra = tuple(prefix for prefix in prefixes if prefix not in self.strip_prefixes)
        return KeyMap(
            name=self.name,
            description=self.description,
            strip_prefixes=self.strip_prefixes + extra,
            converter=self.converter,
            renames=self.renames,
            dropped=self.dropped,
            reinitialised=self.reinitialised,
            from_base=self.from_base,
        )


TEXT_PROJECTION_REASON = (
    "the DiT's text projection reads umT5 embeddings (4096 wide in Wan2.2) in Wan but VLM hidden states in "
    "LightBagel, so its input layer is re-initialised"
)
FUSION_REASON = "fusion blocks are new in LightBagel and start zero-initialised"


# 1. Base models: the Wan2.2 DiT into LightBagelTransformer2DModel.
WAN_DIFFUSERS_TRANSFORMER = KeyMap(
    name="wan-diffusers-transformer",
    description="diffusers WanTransformer3DModel weights (a `transformer/` folder of a diffusers Wan pipeline)",
    reinitialised=(
        (r"^condition_embedder\.text_embedder\.linear_1\.", TEXT_PROJECTION_REASON),
        (r"^fusion_blocks\.", FUSION_REASON),
    ),
)

WAN_ORIGINAL_TRANSFORMER = KeyMap(
    name="wan-original-transformer",
    description="the Wan release layout (`blocks.0.self_attn.q.weight`, `head.head.weight`, ...), "
    "renamed by diffusers' convert_wan_transformer_to_diffusers",
    strip_prefixes=("model.diffusion_model.",),
    converter=convert_wan_transformer_to_diffusers,
    reinitialised=WAN_DIFFUSERS_TRANSFORMER.reinitialised,
)

# 2. Base models: the Wan2.2 VAE into diffusers' AutoencoderKLWan.
WAN_DIFFUSERS_VAE = KeyMap(
    name="wan-diffusers-vae",
    description="diffusers AutoencoderKLWan weights (a `vae/` folder of a diffusers Wan pipeline)",
)

# diffusers 0.42.1 ships `convert_wan_vae_to_diffusers` for the Wan2.1 VAE only; the Wan2.2 VAE nests its residual
# blocks one level deeper (`encoder.downsamples.<i>.downsamples.<j>`), so it is mapped here.
# NOTE: checked against a tiny VAE saved under these names, not against the released Wan2.2_VAE.pth.
_RESIDUAL_PARTS = (
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
)
WAN22_ORIGINAL_VAE = KeyMap(
    name="wan2.2-original-vae",
    description="the Wan2.2 release VAE file "
    "(`Wan2.2_VAE.pth`: `encoder.downsamples.0.downsamples.0.residual.0.gamma`, ...)",
    renames=(
        (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
        (r"^conv1\.", "quant_conv."),
        (r"^conv2\.", "post_quant_conv."),
        (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
        (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
        (
            r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(residual|shortcut)\.",
            r"encoder.down_blocks.\1.resnets.\2.\3.",
        ),
        (
            r"^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample|time_conv)\.",
            r"encoder.down_blocks.\1.downsampler.\2.",
        ),
        (
            r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(residual|shortcut)\.",
            r"decoder.up_blocks.\1.resnets.\2.\3.",
        ),
        (r"^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample|time_conv)\.", r"decoder.up_blocks.\1.upsampler.\2."),
    )
    + _RESIDUAL_PARTS,
)

# 3. Training checkpoints of LightBagelTransformer2DModel.
TRAINING_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

LIGHTBAGEL_FULL_CHECKPOINT = KeyMap(
    name="lightbagel-full",
    description="a full LightBagelTransformer2DModel state dict, as written by a training run",
    strip_prefixes=TRAINING_WRAPPER_PREFIXES,
)

LIGHTBAGEL_FUSION_ONLY_CHECKPOINT = KeyMap(
    name="lightbagel-fusion-only",
    description="only the trained new parameters (`fusion_blocks.*`, optionally the text projection); "
    "every other transformer weight comes from the base folder",
    strip_prefixes=TRAINING_WRAPPER_PREFIXES,
    from_base=(r"^(?!fusion_blocks\.)",),
)

KEY_MAPS = {
    key_map.name: key_map
    for key_map in (
        WAN_DIFFUSERS_TRANSFORMER,
        WAN_ORIGINAL_TRANSFORMER,
        WAN_DIFFUSERS_VAE,
        WAN22_ORIGINAL_VAE,
        LIGHTBAGEL_FULL_CHECKPOINT,
        LIGHTBAGEL_FUSION_ONLY_CHECKPOINT,
    )
}


@dataclass
class KeyReport:
    """Account of every source key and every target parameter of one component."""

    key_map: str
    loaded: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    reinitialised: dict[str, str] = field(default_factory=dict)
    from_base: list[str] = field(default_factory=list)


def strip_key_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if prefix and key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def _first_match(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, reason in rules:
        if re.search(pattern, key):
            return reason
    return None


def _format_keys(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    listed = ", ".join(keys[:limit])
    return listed + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _shared_wrapper_prefix(keys: list[str], target_state_dict: dict) -> str | None:
    """Return the first key segment shared by all `keys` if removing it yields target keys, else None."""
    first_segments = {key.split(".", 1)[0] for key in keys}
    if len(first_segments) != 1 or not all("." in key for key in keys):
        return None
    prefix = first_segments.pop() + "."
    if any(key[len(prefix) :] in target_state_dict for key in keys):
        return prefix
    return None


def rename_state_dict(
    state_dict: dict[str, torch.Tensor], key_map: KeyMap
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Apply the prefix, converter and rename rules of `key_map`.

    Returns the renamed tensors, the source key of each renamed key, and the dropped source keys with reasons.
    Raises ConversionError when two source keys end up under one name.
    """
    dropped: dict[str, str] = {}
    stripped: dict[str, torch.Tensor] = {}
    source_of_stripped: dict[str, str] = {}
    for source_key, tensor in state_dict.items():
        key = strip_key_prefixes(source_key, key_map.strip_prefixes)
        reason = _first_match(key, key_map.dropped)
        if reason is not None:
            dropped[source_key] = reason
            continue
        if key in stripped:
            raise ConversionError(
                f"Source keys {source_of_stripped[key]!r} and {source_key!r} both become {key!r} after stripping the "
                f"prefixes {list(key_map.strip_prefixes)}; the checkpoint holds two copies of one parameter."
            )
        stripped[key] = tensor
        source_of_stripped[key] = source_key

    if key_map.converter is not None:
        # The converter moves tensor objects to new keys, so each tensor's identity gives its source key.
        source_by_id = {id(tensor): source_of_stripped[key] for key, tensor in stripped.items()}
        converted = key_map.converter(dict(stripped))
        source_of_converted = {}
        for key, tensor in converted.items():
            if id(tensor) not in source_by_id:
                raise ConversionError(f"The {key_map.name} converter produced {key!r}, which is not a source tensor.")
            source_of_converted[key] = source_by_id[id(tensor)]
        stripped, source_of_stripped = converted, source_of_converted

    renamed: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, tensor in stripped.items():
        new_key = key
        for pattern, replacement in key_map.renames:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in renamed:
            raise ConversionError(
                f"Source keys {source_of[new_key]!r} and {source_of_stripped[key]!r} both map to {new_key!r} under "
                f"the {key_map.name} key map."
            )
        renamed[new_key] = tensor
        source_of[new_key] = source_of_stripped[key]
    return renamed, source_of, dropped


def build_target_state_dict(
    state_dict: dict[str, torch.Tensor],
    key_map: KeyMap,
    target_state_dict: dict[str, torch.Tensor],
    base_state_dict: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """Map `state_dict` onto the keys of `target_state_dict`, a freshly initialised target model's state dict.

    Every target key is filled from the source, kept at its fresh initialisation (`reinitialised` rules), or taken
    from `base_state_dict` (`from_base` rules). Every source key is used or deliberately dropped. Anything else,
    and any shape mismatch, raises one ConversionError that lists all problems.
    """
    renamed, source_of, dropped = rename_state_dict(state_dict, key_map)
    report = KeyReport(key_map=key_map.name, dropped=dropped)

    result: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for key, fresh in target_state_dict.items():
        reinit_reason = _first_match(key, key_map.reinitialised)
        if reinit_reason is not None:
            result[key] = fresh
            report.reinitialised[key] = reinit_reason
            if key in renamed:
                report.dropped[source_of.pop(key)] = f"replaced by the re-initialised {key}"
                renamed.pop(key)
            continue
        if key in renamed:
            tensor = renamed.pop(key)
            if tuple(tensor.shape) != tuple(fresh.shape):
                source_shape, expected_shape = tuple(tensor.shape), tuple(fresh.shape)
                mismatched.append(f"{key} (source {source_of[key]!r}: {source_shape}, expected {expected_shape})")
            result[key] = tensor
            report.loaded += 1
            continue
        if base_state_dict is not None and any(re.search(pattern, key) for pattern in key_map.from_base):
            if key not in base_state_dict:
                missing.append(f"{key} (not in the base model either)")
                continue
            result[key] = base_state_dict[key]
            report.from_base.append(key)
            continue
        missing.append(key)

    problems = []
    if missing:
        problems.append(f"{len(missing)} target parameters have no source tensor: {_format_keys(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape: {_format_keys(mismatched)}")
    if renamed:
        leftovers = [source_of[key] if source_of[key] == key else f"{source_of[key]} -> {key}" for key in renamed]
        problems.append(
            f"{len(leftovers)} source keys match no target parameter and no drop rule: {_format_keys(leftovers)}"
        )
        prefix = _shared_wrapper_prefix(list(renamed), target_state_dict)
        if prefix is not None:
            problems.append(f"the source keys look wrapped in the prefix {prefix!r}: pass --strip-prefix {prefix}")
    if problems:
        raise ConversionError(f"Cannot convert with the {key_map.name} key map: " + "; ".join(problems) + ".")
    return result, report
