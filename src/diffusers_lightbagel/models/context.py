"""The understanding-stream context that the DiT reads at every denoising step."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass
class LightBagelContext:
    """Understanding-stream tensors computed once per prompt and reused at every denoising step.

    Attributes:
        encoder_hidden_states: (batch, context_len, vlm_dim) last hidden states of the fused VLM, read by the DiT's
            cross-attention.
        attention_mask: (batch, context_len) boolean, True for valid tokens. Padding is always at the end of a row.
        keys: one (batch, context_len, heads, head_dim) tensor per fusion block: the understanding keys.
        values: the understanding values, laid out as `keys`.
        text_embeds: optional cache of `encoder_hidden_states` after the DiT's text projection. It is filled by
            `LightBagelTransformer2DModel.prepare_context` so the denoising loop does not project it again.
        padded: optional cache of `is_padded`, filled by `prepare_context`, so that the denoising loop does not
            read the mask back from the device at every step.
    """

    encoder_hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    text_embeds: torch.Tensor | None = field(default=None)
    padded: bool | None = field(default=None)

    def __post_init__(self):
        batch_size, context_len = self.encoder_hidden_states.shape[:2]
        if tuple(self.attention_mask.shape) != (batch_size, context_len):
            raise ValueError(
                f"attention_mask has shape {tuple(self.attention_mask.shape)}, expected {(batch_size, context_len)} "
                "to match encoder_hidden_states."
            )
        if len(self.keys) != len(self.values):
            raise ValueError(f"Got {len(self.keys)} key tensors but {len(self.values)} value tensors.")
        for index, (key, value) in enumerate(zip(self.keys, self.values)):
            if key.shape[:2] != (batch_size, context_len) or key.shape != value.shape:
                raise ValueError(
                    f"Fusion block {index}: key shape {tuple(key.shape)} and value shape {tuple(value.shape)} must "
                    f"both start with (batch, context_len) = {(batch_size, context_len)}."
                )

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0]

    @property
    def context_len(self) -> int:
        return self.encoder_hidden_states.shape[1]

    @property
    def is_padded(self) -> bool:
        if self.padded is not None:
            return self.padded
        return not bool(self.attention_mask.all())

    def _map(self, fn) -> "LightBagelContext":
        return LightBagelContext(
            encoder_hidden_states=fn(self.encoder_hidden_states),
            attention_mask=fn(self.attention_mask),
            keys=tuple(fn(key) for key in self.keys),
            values=tuple(fn(value) for value in self.values),
            text_embeds=None if self.text_embeds is None else fn(self.text_embeds),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LightBagelContext":
        """Move the context; `dtype` applies to floating-point tensors only."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.is_floating_point():
                return tensor.to(device=device, dtype=dtype)
            return tensor.to(device=device)

        return self._map(move)

    def repeat_interleave(self, repeats: int) -> "LightBagelContext":
        """Repeat each prompt's context `repeats` times along the batch, as for `num_images_per_prompt`."""
        if repeats == 1:
            return self
        return self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def select(self, indices: list[int] | torch.Tensor) -> "LightBagelContext":
        """Return the contexts of the given batch rows."""
        if not isinstance(indices, torch.Tensor):
            indices = torch.tensor(indices, dtype=torch.long)
        indices = indices.to(self.attention_mask.device)
        return self._map(lambda tensor: tensor.index_select(0, indices))

    def trim(self) -> "LightBagelContext":
        """Drop padding columns that no row uses."""
        used = int(self.attention_mask.sum(dim=1).max())
        if used == self.context_len:
            return self
        return self._map(lambda tensor: tensor[:, :used])

    def with_text_embeds(self, text_embeds: torch.Tensor | None) -> "LightBagelContext":
        """Return the context with `text_embeds` set and the padding flag computed once."""
        return replace(self, text_embeds=text_embeds, padded=not bool(self.attention_mask.all()))

    @staticmethod
    def cat(contexts: list["LightBagelContext"]) -> "LightBagelContext":
        """Concatenate contexts along the batch, right-padding shorter ones with masked positions."""
        if not contexts:
            raise ValueError("LightBagelContext.cat needs at least one context.")
        if len(contexts) == 1:
            return contexts[0]
        num_blocks = {len(context.keys) for context in contexts}
        if len(num_blocks) != 1:
            raise ValueError(f"Cannot concatenate contexts with different numbers of fusion blocks: {num_blocks}.")
        context_len = max(context.context_len for context in contexts)

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            missing = context_len - tensor.shape[1]
            if missing == 0:
                return tensor
            # F.pad lists (before, after) pairs from the last dimension backwards; dimension 1 is the sequence.
            pad_width = [0, 0] * (tensor.ndim - 2) + [0, missing]
            return F.pad(tensor, pad_width, value=False if tensor.dtype == torch.bool else 0)

        def cat_field(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([pad(tensor) for tensor in tensors], dim=0)

        has_text_embeds = all(context.text_embeds is not None for context in contexts)
        # The padding flag is known without a device read when every part has one: shorter parts get padded here.
        padded = None
        if all(context.padded is not None for context in contexts):
            padded = any(context.padded or context.context_len < context_len for context in contexts)
        return LightBagelContext(
            encoder_hidden_states=cat_field([c.encoder_hidden_states for c in contexts]),
            attention_mask=cat_field([c.attention_mask for c in contexts]),
            keys=tuple(cat_field([c.keys[i] for c in contexts]) for i in range(len(contexts[0].keys))),
            values=tuple(cat_field([c.values[i] for c in contexts]) for i in range(len(contexts[0].values))),
            text_embeds=cat_field([c.text_embeds for c in contexts]) if has_text_embeds else None,
            padded=padded,
        )
