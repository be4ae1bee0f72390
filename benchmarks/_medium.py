"""A medium LightBagel pipeline for the pipeline-level benchmarks: big enough that the VLM and the DiT cost
milliseconds on a CPU, small enough to build from code in seconds. Random weights, tiny tokenizer and VAE.
"""

from __future__ import annotations

import torch

from diffusers_lightbagel import LightBagelPipeline, LightBagelTransformer2DModel
from diffusers_lightbagel.tiny import (
    TINY_LATENT_CHANNELS,
    build_tiny_processor,
    build_tiny_scheduler,
    build_tiny_vae,
    build_tiny_vlm,
    randomize_fusion_outputs,
)


# A prompt of about 100 byte-level tokens with the tiny tokenizer.
PROMPT = "a red cube on a blue wooden table beside a green glass bottle, soft morning light, photo, high detail"


def build_medium_pipeline(width: int = 256, layers: int = 4, vlm_layers: int = 4, head_dim: int = 64):
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    heads = width // head_dim
    vlm = build_tiny_vlm(
        tokenizer, seed=0, hidden_size=width, num_layers=vlm_layers, head_dim=head_dim, intermediate_size=4 * width
    )
    transformer = LightBagelTransformer2DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        text_dim=width,
        freq_dim=64,
        ffn_dim=4 * width,
        num_layers=layers,
        vlm_hidden_size=width,
        vlm_num_layers=vlm_layers,
    ).eval()
    randomize_fusion_outputs(transformer, std=0.02)
    pipe = LightBagelPipeline(
        vlm=vlm,
        processor=processor,
        transformer=transformer,
        vae=build_tiny_vae(),
        scheduler=build_tiny_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
