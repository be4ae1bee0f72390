"""Pairing of diffusion-transformer blocks with vision-language-model layers."""

from __future__ import annotations

import math


def compute_fusion_layer_map(num_dit_layers: int, num_vlm_layers: int, fusion_depth: float = 0.0) -> list[int]:
    """Return, for each DiT block, the index of the VLM layer whose output it fuses with.

    At `fusion_depth=0` DiT block `i` pairs with the VLM layer at the same relative depth
    (`i * (num_vlm_layers - 1) / (num_dit_layers - 1)`, rounded half up). A depth `d` moves every pairing a fraction `d` of
    the way towards the last VLM layer, so `d=1` pairs every DiT block with the last VLM layer. These are the 0%,
    50% and 100% settings of the LightBagel paper's fusion-depth ablation.
    """
    if num_dit_layers < 1 or num_vlm_layers < 1:
        raise ValueError(
            f"num_dit_layers and num_vlm_layers must be at least 1, got {num_dit_layers} and {num_vlm_layers}."
        )
    if not 0.0 <= fusion_depth <= 1.0:
        raise ValueError(f"fusion_depth must be in [0, 1], got {fusion_depth}.")

    last = num_vlm_layers - 1
    layer_map = []
    for i in range(num_dit_layers):
        same_depth = i * last / (num_dit_layers - 1) if num_dit_layers > 1 else last
        # Round half up, so that the map does not depend on Python's round-half-to-even.
        layer_map.append(int(math.floor(same_depth + fusion_depth * (last - same_depth) + 0.5)))
    return layer_map


def validate_fusion_layer_map(layer_map: list[int], num_dit_layers: int, num_vlm_layers: int) -> list[int]:
    """Check an explicit layer map and return it as a list of ints."""
    layer_map = [int(index) for index in layer_map]
    if len(layer_map) != num_dit_layers:
        raise ValueError(
            f"fusion_layer_map has {len(layer_map)} entries but the transformer has {num_dit_layers} blocks; "
            "give one VLM layer index per DiT block."
        )
    out_of_range = [index for index in layer_map if not 0 <= index < num_vlm_layers]
    if out_of_range:
        raise ValueError(
            f"fusion_layer_map contains VLM layer indices {out_of_range} outside [0, {num_vlm_layers - 1}]."
        )
    return layer_map
