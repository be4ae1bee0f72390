"""Functional checks of the performance and memory features: offloading, VAE tiling and slicing, attention backends,
regional compilation, First Block Cache and the rotary-embedding cache. Nothing here is timed; the benchmarks under
benchmarks/ measure speed and memory.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, MagCacheConfig
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers_lightbagel import LightBagelPipeline
from diffusers_lightbagel.models.cache_registration import blocks_in_execution_order
from diffusers_lightbagel.tiny import build_tiny_components


PROMPT = "a red cube on a blue table"


def make_pipe() -> LightBagelPipeline:
    pipe = LightBagelPipeline(**build_tiny_components(seed=0, fusion_init_std=0.05))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: LightBagelPipeline, **kwargs) -> torch.Tensor:
    options = dict(height=64, width=64, num_inference_steps=2, output_type="pt")
    options.update(kwargs)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **options).images


def encode_context(pipe: LightBagelPipeline):
    context, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    return pipe.transformer.prepare_context(context)


def count_calls(modules) -> dict:
    """Count forward calls of `modules`, a list, in the returned dict under "calls"."""
    record = {"calls": 0}

    def hook(module, args):
        record["calls"] += 1

    for module in modules:
        module.register_forward_pre_hook(hook)
    return record


# ---------------------------------------------------------------- offloading, tiling, slicing


def test_model_cpu_offload_needs_accelerator():
    pipe = make_pipe()
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present; this checks the CPU-only behaviour of diffusers")
    with pytest.raises(RuntimeError, match="requires accelerator"):
        pipe.enable_model_cpu_offload()
    with pytest.raises(RuntimeError, match="requires accelerator"):
        pipe.enable_sequential_cpu_offload()


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_cpu_matches_plain(offload_type):
    reference = generate(make_pipe())
    pipe = make_pipe()
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type, **options)

    output = generate(pipe)

    torch.testing.assert_close(output, reference, atol=1e-5, rtol=0)


def test_vae_slicing_matches_plain():
    reference = generate(make_pipe(), num_images_per_prompt=2)
    pipe = make_pipe()
    pipe.vae.enable_slicing()
    decoded_batches = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decoded_batches.append(args[0].shape[0]))

    output = generate(pipe, num_images_per_prompt=2)

    assert decoded_batches and set(decoded_batches) == {1}
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=0)


def test_vae_tiling_close_to_plain():
    reference = generate(make_pipe(), height=128, width=128)
    pipe = make_pipe()
    pipe.vae.enable_tiling(
        tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=32, tile_sample_stride_width=32
    )
    tiled_calls = count_calls([pipe.vae.decoder])

    output = generate(pipe, height=128, width=128)

    # diffusers starts a 64-pixel tile every 32 pixels of the 128-pixel sides: 4 x 4 tile decodes.
    assert tiled_calls["calls"] == 16
    assert output.shape == reference.shape
    # Blending at the tile seams changes pixels; with the random tiny VAE the mean change is about 0.02 on [0, 1].
    assert float((output - reference).abs().mean()) < 0.05


# ---------------------------------------------------------------- attention backends


def test_attention_backend_reaches_fusion_blocks():
    pipe = make_pipe()
    transformer = pipe.transformer
    context = encode_context(pipe)
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        reference = transformer(latents, timestep, context)[0]

    transformer.set_attention_backend("native")

    for fusion_block in transformer.fusion_blocks:
        assert fusion_block.generation.processor._attention_backend == "native"
        assert fusion_block.understanding.processor._attention_backend == "native"
    for block in transformer.blocks:
        assert block.attn1.processor._attention_backend == "native"
        assert block.attn2.processor._attention_backend == "native"
    with torch.no_grad():
        output = transformer(latents, timestep, context)[0]
    torch.testing.assert_close(output, reference, atol=0, rtol=0)


def test_math_attention_backend_matches_native():
    pipe = make_pipe()
    transformer = pipe.transformer
    context = encode_context(pipe)
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500.0])
    transformer.set_attention_backend("native")
    with torch.no_grad():
        reference = transformer(latents, timestep, context)[0]

    transformer.set_attention_backend("_native_math")

    assert transformer.fusion_blocks[0].generation.processor._attention_backend == "_native_math"
    with torch.no_grad():
        output = transformer(latents, timestep, context)[0]
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- regional compilation


def graphs_per_step(pipe: LightBagelPipeline, **kwargs) -> tuple[list[int], torch.Tensor]:
    """Run the pipeline and return dynamo's graph count after each denoising step, and the image."""
    counts = []

    def record(pipe, step_index, timestep, callback_kwargs):
        counts.append(counters["stats"]["unique_graphs"])
        return callback_kwargs

    images = generate(pipe, callback_on_step_end=record, **kwargs)
    return counts, images


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def test_compiled_blocks_no_recompile_across_steps(fresh_dynamo):
    options = dict(num_inference_steps=4, guidance_interval=(0.0, 1.0))
    reference = generate(make_pipe(), **options)
    pipe = make_pipe()
    pipe.transformer.compile_repeated_blocks(backend="eager", fullgraph=True)

    counts, output = graphs_per_step(pipe, **options)

    # One graph per repeated block class (the DiT block and the fusion block), all made during the first step.
    assert counts[0] == 2
    assert counts == [counts[0]] * len(counts)
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=0)


def test_compiled_blocks_recompile_once_when_guidance_stops(fresh_dynamo):
    pipe = make_pipe()
    pipe.transformer.compile_repeated_blocks(backend="eager", fullgraph=True)

    # With the default guidance interval (0.4, 1.0), the last steps run one branch: the batch goes from 2 to 1.
    counts, _ = graphs_per_step(pipe, num_inference_steps=6)

    first_unguided = next(index for index, count in enumerate(counts) if count > counts[0])
    assert counts[first_unguided] == counts[0] + 2
    assert counts[first_unguided:] == [counts[first_unguided]] * (len(counts) - first_unguided)


# ---------------------------------------------------------------- First Block Cache


def denoise(transformer, context, latents, timesteps) -> list[torch.Tensor]:
    """Call the transformer once per timestep inside a cache context, as a denoising loop does."""
    outputs = []
    with torch.no_grad():
        for timestep in timesteps:
            with transformer.cache_context("cond"):
                outputs.append(transformer(latents, torch.tensor([timestep]), context)[0])
    return outputs


def test_first_block_cache_threshold_zero_matches_plain():
    pipe = make_pipe()
    transformer = pipe.transformer
    context = encode_context(pipe)
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    timesteps = [900.0, 700.0, 500.0, 300.0]
    reference = denoise(transformer, context, latents, timesteps)
    fusion_calls = count_calls([block.generation for block in transformer.fusion_blocks])

    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    output = denoise(transformer, context, latents, timesteps)

    assert fusion_calls["calls"] == len(timesteps) * len(transformer.fusion_blocks)
    for step_output, step_reference in zip(output, reference):
        torch.testing.assert_close(step_output, step_reference, atol=0, rtol=0)


def test_first_block_cache_skip_reuses_fusion_residual():
    pipe = make_pipe()
    transformer = pipe.transformer
    context = encode_context(pipe)
    latents = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    fusion_calls = count_calls([block.generation for block in transformer.fusion_blocks])
    dit_calls = count_calls([block.attn1 for block in transformer.blocks])
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))

    # The second call sees the same first-block residual, so every later block, fusion blocks included, is skipped
    # and the cached residual must reproduce the full output.
    full, cached = denoise(transformer, context, latents, [500.0, 500.0])

    assert fusion_calls["calls"] == len(transformer.fusion_blocks)
    assert dit_calls["calls"] == len(transformer.blocks) + 1
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=0)


def fbc_hook_names(block) -> list[str]:
    registry = HookRegistry.check_if_exists_or_initialize(block)
    return [name for name in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK) if registry.get_hook(name) is not None]


def test_first_block_cache_hooks_every_block():
    transformer = make_pipe().transformer
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))

    ordered = blocks_in_execution_order(transformer)
    hook_names = {name: fbc_hook_names(block) for name, block in ordered}

    assert [name for name, _ in ordered] == ["blocks.0", "fusion_blocks.0", "blocks.1", "fusion_blocks.1"]
    assert hook_names["blocks.0"] == [_FBC_LEADER_BLOCK_HOOK]
    for name in ["fusion_blocks.0", "blocks.1", "fusion_blocks.1"]:
        assert hook_names[name] == [_FBC_BLOCK_HOOK]
    assert transformer.fusion_blocks[1]._diffusers_hook.get_hook(_FBC_BLOCK_HOOK).is_tail
    assert not transformer.blocks[1]._diffusers_hook.get_hook(_FBC_BLOCK_HOOK).is_tail

    transformer.disable_cache()

    assert all(fbc_hook_names(block) == [] for _, block in ordered)


def test_block_skipping_caches_rejected():
    transformer = make_pipe().transformer

    with pytest.raises(ValueError, match="MagCacheConfig is not supported"):
        transformer.enable_cache(MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4))


# ---------------------------------------------------------------- rotary embedding cache


def test_rotary_embedding_computed_once_per_shape():
    pipe = make_pipe()
    transformer = pipe.transformer
    context = encode_context(pipe)
    rope_calls = count_calls([transformer.rope])
    small = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    large = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        first = transformer(small, torch.tensor([900.0]), context)[0]
        transformer(small, torch.tensor([500.0]), context)
        transformer(large, torch.tensor([500.0]), context)
        transformer._rotary_cache.clear()
        recomputed = transformer(small, torch.tensor([900.0]), context)[0]

    assert rope_calls["calls"] == 3
    torch.testing.assert_close(recomputed, first, atol=0, rtol=0)
