"""The LightBagel fusion block: multimodal self-attention between the understanding and generation streams.

Terms used across this package:

- understanding stream: the tokens of the vision-language model (prompt text and ViT image tokens), carried by
  the VLM's hidden states.
- generation stream: the VAE latent tokens carried by the diffusion transformer (DiT).

One fusion block follows each DiT block and, on the understanding side, the VLM layer paired with it. The block
keeps separate projections per stream and attends over the tokens of both with a generalised causal mask.
Understanding tokens attend causally to understanding tokens only. Generation tokens attend to every valid
understanding token and to all generation tokens. Since the understanding stream never reads the generation
stream, its keys and values are computed once per prompt and reused at every denoising step.

Both output projections start at zero, so a new fusion block is an identity on both streams.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.utils.torch_utils import maybe_allow_in_graph


class LightBagelFusionAttnProcessor:
    """Attention of one stream's queries over the shared understanding and generation keys."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "LightBagelFusionAttention",
        hidden_states: torch.Tensor,
        context_key: torch.Tensor | None = None,
        context_value: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value = attn.project_qkv(hidden_states, rotary_emb)

        # Generation queries also read the cached understanding keys and values.
        if context_key is not None:
            attn_key = torch.cat([context_key.to(key.dtype), key], dim=1)
            attn_value = torch.cat([context_value.to(value.dtype), value], dim=1)
        else:
            attn_key, attn_value = key, value

        attn_output = dispatch_attention_fn(
            query,
            attn_key,
            attn_value,
            attn_mask=attention_mask,
            is_causal=is_causal,
            backend=self._attention_backend,
        )
        attn_output = attn_output.flatten(2, 3).type_as(hidden_states)
        return attn.to_out(attn_output), key, value


class LightBagelFusionAttention(nn.Module, AttentionModuleMixin):
    """Projections of one stream into, and back out of, the shared fusion attention."""

    _default_processor_cls = LightBagelFusionAttnProcessor
    _available_processors = [LightBagelFusionAttnProcessor]

    def __init__(self, dim: int, heads: int, dim_head: int, eps: float = 1e-6, processor=None):
        super().__init__()
        self.heads = heads
        self.inner_dim = heads * dim_head

        self.norm = nn.RMSNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=True)
        self.norm_q = nn.RMSNorm(dim_head, eps=eps)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps)
        self.to_out = nn.Linear(self.inner_dim, dim, bias=True)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

        self.set_processor(processor or self._default_processor_cls())

    def project_qkv(
        self, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return query, key and value of shape (batch, seq_len, heads, head_dim)."""
        normed = self.norm(hidden_states)
        query = self.norm_q(self.to_q(normed).unflatten(2, (self.heads, -1)))
        key = self.norm_k(self.to_k(normed).unflatten(2, (self.heads, -1)))
        value = self.to_v(normed).unflatten(2, (self.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)
        return query, key, value

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        return self.processor(self, hidden_states, **kwargs)


@maybe_allow_in_graph
class LightBagelFusionBlock(nn.Module):
    """One fusion block: the understanding-side and generation-side halves of a multimodal self-attention.

    `forward_understanding` runs inside the VLM, after the paired VLM layer, once per prompt. `forward` runs
    inside the DiT, after the paired DiT block, at every denoising step, and reads the understanding keys and
    values that `forward_understanding` returned.
    """

    def __init__(self, dit_dim: int, vlm_dim: int, num_attention_heads: int, attention_head_dim: int, eps: float):
        super().__init__()
        # 1. Understanding stream
        self.understanding = LightBagelFusionAttention(vlm_dim, num_attention_heads, attention_head_dim, eps)
        # 2. Generation stream
        self.generation = LightBagelFusionAttention(dit_dim, num_attention_heads, attention_head_dim, eps)

    def forward_understanding(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Update the VLM hidden states and return them with this block's understanding keys and values.

        `attention_mask` is a (batch, seq_len) boolean key mask, True for valid tokens, or None when every token
        is valid. Padding must sit at the end of each row (right padding), so that every query has a valid key.
        """
        # 1. Understanding stream: causal self-attention over valid understanding tokens only.
        if attention_mask is None:
            mask, is_causal = None, True
        else:
            seq_len = hidden_states.shape[1]
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=hidden_states.device).tril()
            mask, is_causal = causal[None, None] & attention_mask[:, None, None, :], False
        attn_output, key, value = self.understanding(hidden_states, attention_mask=mask, is_causal=is_causal)
        return hidden_states + attn_output, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        context_key: torch.Tensor,
        context_value: torch.Tensor,
        context_mask: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Update the DiT hidden states from the understanding keys and values and the generation tokens.

        `context_mask` is a (batch, 1, 1, context_len + seq_len) boolean key mask, or None when all keys are valid.
        """
        # 2. Generation stream: full attention over valid understanding tokens and all generation tokens.
        attn_output, _, _ = self.generation(
            hidden_states,
            context_key=context_key,
            context_value=context_value,
            attention_mask=context_mask,
            rotary_emb=rotary_emb,
        )
        return hidden_states + attn_output
