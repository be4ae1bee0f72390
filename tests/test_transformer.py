"""Specifications of LightBagelTransformer2DModel, the fusion blocks and the understanding context."""

import inspect

import pytest
import torch

from diffusers import WanTransformer3DModel
from diffusers_lightbagel.models import LightBagelContext, compute_fusion_layer_map, encode_understanding
from diffusers_lightbagel.models.understanding import get_vlm_decoder_layers
from diffusers_lightbagel.tiny import build_tiny_components, build_tiny_transformer, randomize_fusion_outputs


def _vlm_inputs(processor, texts):
    return dict(processor(text=texts, padding=True, padding_side="right", return_tensors="pt"))


def _chat(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def _bare_wan(transformer):
    parameters = inspect.signature(WanTransformer3DModel.__init__).parameters
    config = {key: value for key, value in transformer.config.items() if key in parameters}
    wan = WanTransformer3DModel(**config).eval()
    result = wan.load_state_dict(transformer.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(key.startswith("fusion_blocks.") for key in result.unexpected_keys)
    return wan


@torch.no_grad()
def test_zero_init_matches_bare_wan():
    components = build_tiny_components(fusion_init_std=0.0)
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    wan = _bare_wan(transformer)
    context = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat("a red circle")]))
    latents = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(0))

    for timestep in (torch.tensor([700.0]), torch.full((1, 6), 300.0)):
        ours = transformer(latents, timestep, context).sample
        reference = wan(latents, timestep, context.encoder_hidden_states).sample
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


@torch.no_grad()
def test_zero_init_keeps_vlm_hidden_states():
    components = build_tiny_components(fusion_init_std=0.0)
    inputs = _vlm_inputs(components["processor"], [_chat("a red circle"), _chat("two blue squares on the left")])
    context = encode_understanding(components["vlm"], components["transformer"], inputs)
    plain = components["vlm"].model(**inputs).last_hidden_state

    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(context.encoder_hidden_states[mask], plain[mask], rtol=0, atol=1e-6)


@torch.no_grad()
def test_nonzero_fusion_prompt_changes_output():
    components = build_tiny_components(fusion_init_std=0.05)
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    outputs = []
    for prompt in ("a red circle", "a green triangle at the top"):
        context = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat(prompt)]))
        outputs.append(transformer(latents, torch.tensor([500.0]), context).sample)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


@torch.no_grad()
def test_nonzero_fusion_changes_vlm_states():
    components = build_tiny_components(fusion_init_std=0.05)
    inputs = _vlm_inputs(components["processor"], [_chat("a red circle")])
    context = encode_understanding(components["vlm"], components["transformer"], inputs)
    plain = components["vlm"].model(**inputs).last_hidden_state
    assert (context.encoder_hidden_states - plain).abs().max() > 1e-4


def test_fusion_only_path_reaches_output():
    # Even with the cross-attention context zeroed out, the prompt reaches the DiT through the fusion blocks.
    components = build_tiny_components(fusion_init_std=0.05)
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        contexts = [
            encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat(prompt)]))
            for prompt in ("red", "blue")
        ]
        contexts = [
            LightBagelContext(
                torch.zeros_like(context.encoder_hidden_states), context.attention_mask, context.keys, context.values
            )
            for context in contexts
        ]
        first, second = (transformer(latents, torch.tensor([500.0]), c).sample for c in contexts)
    assert (first - second).abs().max() > 1e-5


@torch.no_grad()
def test_latents_never_reach_understanding_stream():
    components = build_tiny_components(fusion_init_std=0.05)
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    context = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat("a red circle")]))
    snapshot = [key.clone() for key in context.keys] + [context.encoder_hidden_states.clone()]

    for seed in range(2):
        latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
        transformer(latents, torch.tensor([500.0]), context)

    after = list(context.keys) + [context.encoder_hidden_states]
    for before, now in zip(snapshot, after):
        assert torch.equal(before, now)
    # The understanding half of a fusion block has no input that could carry the latents.
    assert set(inspect.signature(transformer.fusion_blocks[0].forward_understanding).parameters) == {
        "hidden_states",
        "attention_mask",
    }


def test_gradients_reach_fusion_understanding_halves():
    components = build_tiny_components(fusion_init_std=0.05)
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    vlm.requires_grad_(False)
    context = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat("a red circle")]))
    latents = torch.randn(1, 16, 1, 4, 4)
    transformer(latents, torch.tensor([500.0]), context).sample.square().mean().backward()
    assert transformer.fusion_blocks[0].understanding.to_q.weight.grad.abs().sum() > 0
    assert transformer.fusion_blocks[-1].generation.to_out.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in vlm.parameters())


def test_padding_does_not_change_context_rows():
    components = build_tiny_components(fusion_init_std=0.05)
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    with torch.no_grad():
        alone = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat("red")]))
        batched = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat("red"), _chat("a much longer prompt")]))
        first = batched.select([0]).trim()
    assert first.context_len == alone.context_len
    torch.testing.assert_close(first.encoder_hidden_states, alone.encoder_hidden_states, rtol=1e-5, atol=1e-5)
    for key_alone, key_batched in zip(alone.keys, first.keys):
        torch.testing.assert_close(key_batched, key_alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "depth, expected",
    [
        (0.0, [0, 1, 2, 4, 5, 6, 7]),
        (0.5, [4, 4, 5, 5, 6, 6, 7]),
        (1.0, [7, 7, 7, 7, 7, 7, 7]),
    ],
)
def test_layer_map_fusion_depth(depth, expected):
    assert compute_fusion_layer_map(7, 8, depth) == expected


def test_layer_map_pairs_full_size_ends():
    layer_map = compute_fusion_layer_map(30, 28, 0.0)
    assert layer_map[0] == 0
    assert layer_map[-1] == 27
    assert sorted(layer_map) == layer_map
    assert set(layer_map) == set(range(28))


def test_explicit_layer_map_rejects_bad_index():
    with pytest.raises(ValueError, match=r"outside \[0, 2\]"):
        build_tiny_transformer(fusion_layer_map=[0, 3])
    with pytest.raises(ValueError, match="has 1 entries but the transformer has 2 blocks"):
        build_tiny_transformer(fusion_layer_map=[0])


def test_explicit_layer_map_runs_blocks_after_that_layer():
    transformer = build_tiny_transformer(fusion_layer_map=[2, 2])
    assert transformer.fusion_blocks_by_vlm_layer() == {2: [0, 1]}


def test_context_batch_mismatch_raises():
    components = build_tiny_components()
    transformer = components["transformer"]
    context = encode_understanding(
        components["vlm"], transformer, _vlm_inputs(components["processor"], [_chat("a")])
    )
    with pytest.raises(ValueError, match="batch size 1 but hidden_states has 2"):
        transformer(torch.randn(2, 16, 1, 4, 4), torch.tensor([1.0, 1.0]), context)


def test_vlm_shape_mismatch_raises():
    components = build_tiny_components()
    transformer = build_tiny_transformer(vlm_num_layers=5)
    with pytest.raises(ValueError, match="expect 5 layers of width 32"):
        encode_understanding(components["vlm"], transformer, _vlm_inputs(components["processor"], [_chat("a")]))


def test_hooks_removed_after_encoding():
    components = build_tiny_components(fusion_init_std=0.05)
    layers = get_vlm_decoder_layers(components["vlm"])
    encode_understanding(components["vlm"], components["transformer"], _vlm_inputs(components["processor"], [_chat("a")]))
    assert all(len(layer._forward_hooks) == 0 for layer in layers)


def test_randomize_fusion_outputs_is_seeded():
    first, second = build_tiny_transformer(), build_tiny_transformer()
    randomize_fusion_outputs(first, 0.1, seed=3)
    randomize_fusion_outputs(second, 0.1, seed=3)
    assert torch.equal(first.fusion_blocks[1].generation.to_out.weight, second.fusion_blocks[1].generation.to_out.weight)
    assert first.fusion_blocks[1].generation.to_out.weight.abs().sum() > 0


def test_prepared_context_knows_padding():
    components = build_tiny_components()
    transformer, vlm, processor = components["transformer"], components["vlm"], components["processor"]
    with torch.no_grad():
        batched = encode_understanding(vlm, transformer, _vlm_inputs(processor, [_chat("red"), _chat("a longer one")]))
    short = transformer.prepare_context(batched.select([0]).trim())
    long = transformer.prepare_context(batched.select([1]).trim())
    assert short.padded is False
    assert long.padded is False
    assert LightBagelContext.cat([short, long]).padded is True
    assert LightBagelContext.cat([long, long]).padded is False
    assert LightBagelContext.cat([short, long]).is_padded == (not bool(LightBagelContext.cat([short, long]).attention_mask.all()))
