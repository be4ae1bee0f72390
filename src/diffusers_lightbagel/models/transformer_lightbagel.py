"""LightBagelTransformer2DModel: the Wan2.2 diffusion transformer with a fusion block after every DiT block."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)
from diffusers.utils import apply_lora_scale, logging
from diffusers.utils.torch_utils import maybe_allow_in_graph

from .cache_registration import LightBagelCacheMixin
from .context import LightBagelContext
from .fusion_attention import LightBagelFusionBlock
from .layer_map import compute_fusion_layer_map, validate_fusion_layer_map


logger = logging.get_logger(__name__)


@maybe_allow_in_graph
class LightBagelTransformerBlock(WanTransformerBlock):
    """A Wan DiT block, unchanged in weights, whose cross-attention can mask padded context tokens."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        modulation = self.scale_shift_table.unsqueeze(0) + temb.float() if temb.ndim == 4 else None
        if modulation is not None:
            # Per-token timesteps: temb is (batch, seq_len, 6, dim), each chunk (batch, seq_len, dim).
            chunks = [chunk.squeeze(2) for chunk in modulation.chunk(6, dim=2)]
        else:
            # One timestep per sample: temb is (batch, 6, dim), each chunk (batch, 1, dim).
            chunks = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = chunks

        # 1. Self-attention
        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Cross-attention over the understanding stream's last hidden states
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, encoder_attention_mask, None)
        hidden_states = hidden_states + attn_output

        # 3. Feed-forward
        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


class LightBagelTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, LightBagelCacheMixin, AttentionMixin):
    """The generation branch of LightBagel: a Wan2.2 DiT whose blocks are each followed by a fusion block.

    The DiT part has the weight layout of diffusers' `WanTransformer3DModel`, so Wan2.2-TI2V-5B weights load into
    it unchanged except the text projection (`condition_embedder.text_embedder`), whose input width is the VLM
    width (`text_dim`) instead of umT5's. The model also holds the understanding-side half of each fusion block.
    `models.understanding.encode_understanding` runs those halves inside the VLM and returns a `LightBagelContext`,
    which `forward` reads.

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, freq_dim, ffn_dim,
        num_layers, cross_attn_norm, qk_norm, eps, rope_max_seq_len: as in `WanTransformer3DModel`.
        text_dim: width of the context the cross-attention reads, the VLM hidden size.
        vlm_hidden_size: hidden size of the VLM layers the fusion blocks read and update.
        vlm_num_layers: number of VLM decoder layers, used to build the default layer map.
        fusion_num_attention_heads, fusion_attention_head_dim: shape of the fusion attention; default to the DiT's.
        fusion_depth: 0 pairs DiT block i with the VLM layer at the same relative depth, 1 with the last VLM layer.
        fusion_layer_map: explicit VLM layer index per DiT block; overrides `fusion_depth`.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["LightBagelTransformerBlock", "LightBagelFusionBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _repeated_blocks = ["LightBagelTransformerBlock", "LightBagelFusionBlock"]
    # Latent shapes whose rotary embeddings are kept; a pipeline call uses one shape.
    _rotary_cache_size = 4

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        in_channels: int = 48,
        out_channels: int = 48,
        text_dim: int = 3584,
        freq_dim: int = 256,
        ffn_dim: int = 14336,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        vlm_hidden_size: int = 3584,
        vlm_num_layers: int = 28,
        fusion_num_attention_heads: int | None = None,
        fusion_attention_head_dim: int | None = None,
        fusion_depth: float = 0.0,
        fusion_layer_map: list[int] | None = None,
    ) -> None:
        super().__init__()

        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        fusion_heads = fusion_num_attention_heads or num_attention_heads
        fusion_head_dim = fusion_attention_head_dim or attention_head_dim
        if fusion_layer_map is None:
            self.fusion_layer_map = compute_fusion_layer_map(num_layers, vlm_num_layers, fusion_depth)
        else:
            self.fusion_layer_map = validate_fusion_layer_map(fusion_layer_map, num_layers, vlm_num_layers)

        # 1. Patch and position embedding
        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.fusion_rope = (
            WanRotaryPosEmbed(fusion_head_dim, patch_size, rope_max_seq_len)
            if fusion_head_dim != attention_head_dim
            else None
        )
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)

        # 2. Timestep embedding and text projection
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim
        )

        # 3. DiT blocks, each followed by a fusion block
        self.blocks = nn.ModuleList(
            [
                LightBagelTransformerBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )
        self.fusion_blocks = nn.ModuleList(
            [
                LightBagelFusionBlock(inner_dim, vlm_hidden_size, fusion_heads, fusion_head_dim, eps)
                for _ in range(num_layers)
            ]
        )

        # 4. Output norm and projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        # Rotary embeddings per (latent shape, device, dtype); see `_rotary_embeddings`.
        self._rotary_cache: dict = {}

    def fusion_blocks_by_vlm_layer(self) -> dict[int, list[int]]:
        """Return, for each VLM layer that has fusion blocks after it, their indices in execution order."""
        blocks_by_layer: dict[int, list[int]] = {}
        for block_index, vlm_layer in enumerate(self.fusion_layer_map):
            blocks_by_layer.setdefault(vlm_layer, []).append(block_index)
        return blocks_by_layer

    def prepare_context(self, context: LightBagelContext) -> LightBagelContext:
        """Project the context for the cross-attention once, so the denoising loop does not repeat it."""
        text_embeds = self.condition_embedder.text_embedder(context.encoder_hidden_states.to(self.dtype))
        return context.with_text_embeds(text_embeds)

    def _rotary_embeddings(self, hidden_states: torch.Tensor):
        """Return the DiT and fusion rotary embeddings for this latent shape, computed once per shape and device."""
        key = (tuple(hidden_states.shape[2:]), self.rope.freqs_cos.device, self.rope.freqs_cos.dtype)
        cached = self._rotary_cache.get(key)
        if cached is not None:
            return cached

        rotary_emb = self.rope(hidden_states)
        fusion_rotary = self.fusion_rope(hidden_states) if self.fusion_rope is not None else rotary_emb
        # Wan returns (1, seq_len, 1, head_dim); the fusion attention takes (seq_len, head_dim).
        fusion_rotary = (fusion_rotary[0][0, :, 0], fusion_rotary[1][0, :, 0])
        # Nothing is cached while the buffers sit on the meta device (sequential offload). Nothing is cached while
        # torch.compile traces the whole model either, because the cache is a Python dict.
        if key[1].type != "meta" and not torch.compiler.is_compiling():
            if len(self._rotary_cache) >= self._rotary_cache_size:
                self._rotary_cache.pop(next(iter(self._rotary_cache)))
            self._rotary_cache[key] = (rotary_emb, fusion_rotary)
        return rotary_emb, fusion_rotary

    def _embed_timestep(self, timestep: torch.Tensor, seq_len: int | None, dtype: torch.dtype):
        embedder = self.condition_embedder
        timestep_freqs = embedder.timesteps_proj(timestep.flatten())
        if seq_len is not None:
            timestep_freqs = timestep_freqs.unflatten(0, (-1, seq_len))
        time_embedder_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if time_embedder_dtype != torch.int8:
            timestep_freqs = timestep_freqs.to(time_embedder_dtype)
        temb = embedder.time_embedder(timestep_freqs).to(dtype)
        timestep_proj = embedder.time_proj(embedder.act_fn(temb))
        # (batch, seq_len, 6, dim) for per-token timesteps, else (batch, 6, dim)
        timestep_proj = timestep_proj.unflatten(-1, (6, -1))
        return temb, timestep_proj

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        context: LightBagelContext,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow-matching velocity of `hidden_states`.

        Args:
            hidden_states: (batch, channels, frames, height, width) latents. For editing, the clean reference latents
                are extra frames here, with timestep 0.
            timestep: (batch,) one timestep per sample, or (batch, seq_len) one per latent token after patching.
            context: the understanding-stream context for this batch, from `encode_understanding`.
        """
        batch_size, _, num_frames, height, width = hidden_states.shape
        if context.batch_size != batch_size:
            raise ValueError(
                f"The context has batch size {context.batch_size} but hidden_states has {batch_size}; repeat the "
                "context per image (LightBagelContext.repeat_interleave) or pass matching latents."
            )
        if len(context.keys) != len(self.fusion_blocks):
            raise ValueError(
                f"The context has keys for {len(context.keys)} fusion blocks but the model has "
                f"{len(self.fusion_blocks)}; it was encoded for another model."
            )
        p_t, p_h, p_w = self.config.patch_size
        post_patch_shape = (num_frames // p_t, height // p_h, width // p_w)

        rotary_emb, fusion_rotary = self._rotary_embeddings(hidden_states)

        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        seq_len = hidden_states.shape[1]

        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        per_token = timestep.ndim == 2
        temb, timestep_proj = self._embed_timestep(timestep, seq_len if per_token else None, hidden_states.dtype)

        text_embeds = context.text_embeds
        if text_embeds is None:
            text_embeds = self.condition_embedder.text_embedder(context.encoder_hidden_states.to(hidden_states.dtype))
        cross_attention_mask = fusion_mask = None
        if context.is_padded:
            cross_attention_mask = context.attention_mask[:, None, None, :]
            generation_keys = context.attention_mask.new_ones(batch_size, seq_len)
            fusion_mask = torch.cat([context.attention_mask, generation_keys], dim=1)[:, None, None, :]

        # 3. DiT blocks and fusion blocks
        for index, (block, fusion_block) in enumerate(zip(self.blocks, self.fusion_blocks)):
            block_args = (hidden_states, text_embeds, timestep_proj, rotary_emb, cross_attention_mask)
            fusion_args = (context.keys[index], context.values[index], fusion_mask, fusion_rotary)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *block_args)
                hidden_states = self._gradient_checkpointing_func(fusion_block, hidden_states, *fusion_args)
            else:
                hidden_states = block(*block_args)
                hidden_states = fusion_block(hidden_states, *fusion_args)

        # 4. Output norm, projection and unpatchify
        if per_token:
            # temb is (batch, seq_len, dim)
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        shift = shift.to(hidden_states.device)
        scale = scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)

        hidden_states = hidden_states.reshape(batch_size, *post_patch_shape, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
