"""Running the frozen VLM with the understanding-side halves of the fusion blocks."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .context import LightBagelContext


def get_vlm_decoder_layers(vlm: nn.Module) -> nn.ModuleList:
    """Return the decoder layers of a Qwen2.5-VL model (`Qwen2_5_VLForConditionalGeneration` or its `.model`)."""
    model = getattr(vlm, "model", vlm)
    language_model = getattr(model, "language_model", None)
    layers = getattr(language_model, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(vlm).__name__} has no `model.language_model.layers`; LightBagel expects a Qwen2.5-VL model "
            "such as transformers' Qwen2_5_VLForConditionalGeneration."
        )
    return layers


def check_vlm_matches_transformer(vlm: nn.Module, transformer: nn.Module) -> None:
    """Raise if the VLM's depth or width differs from what the transformer's fusion blocks were built for."""
    text_config = vlm.config.get_text_config()
    num_layers = len(get_vlm_decoder_layers(vlm))
    expected_layers = transformer.config.vlm_num_layers
    expected_width = transformer.config.vlm_hidden_size
    if num_layers != expected_layers or text_config.hidden_size != expected_width:
        raise ValueError(
            f"The VLM has {num_layers} layers of width {text_config.hidden_size}, but the transformer's fusion blocks "
            f"expect {expected_layers} layers of width {expected_width} (transformer config `vlm_num_layers`, "
            "`vlm_hidden_size`). Load the VLM that the transformer was trained with."
        )


@contextmanager
def _fusion_hooks(vlm: nn.Module, transformer: nn.Module, key_mask: torch.Tensor | None, keys: list, values: list):
    layers = get_vlm_decoder_layers(vlm)

    def make_hook(block_indices: list[int]):
        def apply_understanding_fusion(module, args, output):
            hidden_states = output[0] if isinstance(output, tuple) else output
            vlm_device, vlm_dtype = hidden_states.device, hidden_states.dtype
            for index in block_indices:
                block = transformer.fusion_blocks[index]
                weight = block.understanding.to_q.weight
                # Under sequential CPU offload the weights sit on the meta device and accelerate moves them.
                device = vlm_device if weight.device.type == "meta" else weight.device
                mask = None if key_mask is None else key_mask.to(device)
                hidden_states, key, value = block.forward_understanding(
                    hidden_states.to(device=device, dtype=block.understanding.to_q.weight.dtype), mask
                )
                keys[index], values[index] = key, value
            hidden_states = hidden_states.to(device=vlm_device, dtype=vlm_dtype)
            return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states

        return apply_understanding_fusion

    handles = [
        layers[vlm_layer].register_forward_hook(make_hook(block_indices))
        for vlm_layer, block_indices in transformer.fusion_blocks_by_vlm_layer().items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def encode_understanding(vlm: nn.Module, transformer: nn.Module, model_inputs: dict) -> LightBagelContext:
    """Run the VLM once with the fusion blocks' understanding halves and return the context for the DiT.

    `model_inputs` is the processor output (`input_ids`, `attention_mask`, and `pixel_values` with `image_grid_thw`
    when the prompt contains images), right-padded. The understanding stream never reads the latents, so the returned
    context serves every denoising step.
    """
    check_vlm_matches_transformer(vlm, transformer)
    attention_mask = model_inputs["attention_mask"].bool()
    if not bool(attention_mask[:, 0].all()):
        raise ValueError("The understanding stream needs right padding; set the tokenizer's padding_side='right'.")
    key_mask = None if bool(attention_mask.all()) else attention_mask

    num_blocks = len(transformer.fusion_blocks)
    keys: list = [None] * num_blocks
    values: list = [None] * num_blocks
    # Call the top-level VLM so that offloading hooks on it run, and read the last hidden states at the final norm;
    # logits_to_keep=1 spares the language-model head from computing logits for every token.
    captured = {}
    final_norm = getattr(vlm, "model", vlm).language_model.norm
    norm_handle = final_norm.register_forward_hook(lambda module, args, output: captured.update(last=output))
    extra_kwargs = {"logits_to_keep": 1} if hasattr(vlm, "lm_head") else {}
    try:
        with _fusion_hooks(vlm, transformer, key_mask, keys, values):
            vlm(**model_inputs, use_cache=False, return_dict=True, **extra_kwargs)
    finally:
        norm_handle.remove()

    return LightBagelContext(
        encoder_hidden_states=captured["last"],
        attention_mask=attention_mask,
        keys=tuple(keys),
        values=tuple(values),
    )
