"""A medium LightBagel pipeline for the pipeline-level benchmarks: big enough that the VLM and the DiT cost
milliseconds on a CPU, small enough to build from code in seconds. Random weights, tiny tokenizer and VAE.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diffusers_lightbagel import LightBagelPipeline, LightBagelTransformer2DModel
from diffusers_lightbagel.tiny import (
    TINY_LATENT_CHANNELS,
    build_tiny_processor,
    build_tiny_scheduler,
    build_tiny_vae,
    randomize_fusion_outputs,
)


# A prompt of about 100 byte-level tokens with the tiny tokenizer.
PROMPT = "a red cube on a blue wooden table beside a green glass bottle, soft morning light, photo, high detail"


def build_medium_pipeline(width: int = 256, layers: int = 4, vlm_layers: int = 4, head_dim: int = 64):
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids
    heads = width // head_dim
    quarter = head_dim // 8
    vlm_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": vlm_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            # mRoPE sections add up to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2 * quarter, quarter, quarter],
            },
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": width,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(0)
    vlm = Qwen2_5_VLForConditionalGeneration(vlm_config).eval()
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
