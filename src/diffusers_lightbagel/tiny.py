"""Tiny LightBagel components, built offline from code, for tests and the command line's embedded default.

Every component has the architecture of the real model (Qwen2.5-VL, the Wan2.2 VAE, the LightBagel transformer)
at a few thousand times fewer parameters. The weights are random: a tiny pipeline proves shapes and data flow, not
image quality.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .models.transformer_lightbagel import LightBagelTransformer2DModel


QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

TINY_VLM_HIDDEN_SIZE = 32
TINY_VLM_LAYERS = 3
TINY_LATENT_CHANNELS = 16


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """Return a byte-level Qwen2 tokenizer with no merges: one token per UTF-8 byte plus Qwen's special tokens."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(set(bytes_to_unicode().values())))}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024, padding_side="right")
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    return tokenizer


def build_tiny_processor() -> Qwen2_5_VLProcessor:
    """Return a Qwen2.5-VL processor whose images become at most 16 ViT tokens (one per 28x28 pixels)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    video_processor = Qwen2VLVideoProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(), video_processor=video_processor
    )


def build_tiny_vlm(
    tokenizer: Qwen2Tokenizer | None = None,
    seed: int = 0,
    hidden_size: int = TINY_VLM_HIDDEN_SIZE,
    num_layers: int = TINY_VLM_LAYERS,
    head_dim: int = 16,
    intermediate_size: int | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Return a random Qwen2.5-VL with a 2-block ViT; the defaults are the tiny test model's sizes."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    # Qwen2.5-VL's multimodal rotary sections (time, height, width) add up to head_dim / 2.
    quarter = head_dim // 8
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": hidden_size // head_dim,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2 * quarter, quarter, quarter]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
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
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """Return a Wan2.2-style VAE (residual, 2x2 patchified, 16x spatial compression) with 16 latent channels.

    With `patch_size=2` the encoder takes 3 * 2 * 2 = 12 input channels, as in the Wan2.2 VAE config.
    """
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=TINY_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * TINY_LATENT_CHANNELS,
        latents_std=[1.0] * TINY_LATENT_CHANNELS,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
    ).eval()


def build_tiny_transformer(seed: int = 0, fusion_init_std: float = 0.0, **overrides) -> LightBagelTransformer2DModel:
    """Return a two-block LightBagel transformer for the tiny VLM.

    `fusion_init_std` > 0 fills the fusion blocks' output projections with normal noise of that scale, so that the
    fusion path has an effect; 0 keeps the zero initialisation of a freshly converted model.
    """
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        text_dim=TINY_VLM_HIDDEN_SIZE,
        freq_dim=16,
        ffn_dim=48,
        num_layers=2,
        rope_max_seq_len=256,
        vlm_hidden_size=TINY_VLM_HIDDEN_SIZE,
        vlm_num_layers=TINY_VLM_LAYERS,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    transformer = LightBagelTransformer2DModel(**config)
    if fusion_init_std > 0:
        randomize_fusion_outputs(transformer, fusion_init_std, seed=seed)
    return transformer.eval()


def randomize_fusion_outputs(transformer: LightBagelTransformer2DModel, std: float, seed: int = 0) -> None:
    """Fill every fusion output projection with N(0, std) noise, as a trained model would have non-zero ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in transformer.fusion_blocks:
            for stream in (block.understanding, block.generation):
                weight = stream.to_out.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def build_tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_tiny_components(seed: int = 0, fusion_init_std: float = 0.0) -> dict:
    """Return the five components of a tiny LightBagel pipeline, keyed by component name."""
    processor = build_tiny_processor()
    return {
        "vlm": build_tiny_vlm(processor.tokenizer, seed=seed),
        "processor": processor,
        "transformer": build_tiny_transformer(seed=seed + 1, fusion_init_std=fusion_init_std),
        "vae": build_tiny_vae(seed=seed + 2),
        "scheduler": build_tiny_scheduler(),
    }
