"""Specifications of LightBagelPipeline and LightBagelEditPipeline on the tiny model."""

import numpy as np
import pytest
import torch

from diffusers import DiffusionPipeline
from diffusers_lightbagel import LightBagelEditPipeline, LightBagelPipeline


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


class CallCounter:
    """Counts forward calls of a module and records the batch size of each."""

    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        first = args[0] if args else next(value for value in kwargs.values() if torch.is_tensor(value))
        self.batch_sizes.append(first.shape[0])

    @property
    def calls(self):
        return len(self.batch_sizes)


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_t2i_calls_vlm_once(tiny_pipe, steps):
    counter = CallCounter(tiny_pipe.vlm)
    tiny_pipe("a red circle", height=64, width=64, num_inference_steps=steps, guidance_interval=(0.0, 1.0),
              output_type="latent")
    # One VLM call carries both guidance branches (prompt and negative prompt) as one batch.
    assert counter.calls == 1
    assert counter.batch_sizes == [2]


@pytest.mark.parametrize("steps", [1, 4])
def test_edit_calls_vlm_once(tiny_edit_pipe, rgb_image, steps):
    counter = CallCounter(tiny_edit_pipe.vlm)
    tiny_edit_pipe(image=rgb_image, prompt="make it red", num_inference_steps=steps, output_type="latent")
    assert counter.calls == 1
    assert counter.batch_sizes == [3]


def test_t2i_guidance_off_skips_negative_branch(tiny_pipe):
    vlm_counter = CallCounter(tiny_pipe.vlm)
    dit_counter = CallCounter(tiny_pipe.transformer)
    tiny_pipe("a red circle", height=64, width=64, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    assert vlm_counter.batch_sizes == [1]
    assert dit_counter.batch_sizes == [1, 1, 1]


def test_t2i_guidance_interval_limits_branches(tiny_pipe):
    dit_counter = CallCounter(tiny_pipe.transformer)
    tiny_pipe("a red circle", height=64, width=64, num_inference_steps=4, guidance_interval=(0.4, 1.0),
              output_type="latent")
    sigmas = tiny_pipe.scheduler.sigmas[:-1].tolist()
    expected = [2 if 0.4 <= sigma <= 1.0 else 1 for sigma in sigmas]
    assert dit_counter.batch_sizes == expected
    assert 1 in expected
    assert 2 in expected


def test_t2i_sequential_guidance_matches_batched(tiny_pipe):
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, output_type="np")
    batched = tiny_pipe(**kwargs, generator=_generator(), batch_guidance_branches=True).images
    sequential = tiny_pipe(**kwargs, generator=_generator(), batch_guidance_branches=False).images
    np.testing.assert_allclose(batched, sequential, atol=1e-5)


def test_t2i_output_size_and_types(tiny_pipe):
    for output_type, expected_type in (("np", np.ndarray), ("pt", torch.Tensor), ("latent", torch.Tensor)):
        images = tiny_pipe("a circle", height=64, width=96, num_inference_steps=2, output_type=output_type).images
        assert isinstance(images, expected_type)
    assert tiny_pipe("a circle", height=64, width=96, num_inference_steps=2, output_type="np").images.shape == (1, 64, 96, 3)
    assert tiny_pipe("a circle", height=64, width=96, num_inference_steps=2, output_type="pt").images.shape == (1, 3, 64, 96)
    assert tiny_pipe("a circle", height=64, width=96, num_inference_steps=2, output_type="latent").images.shape == (1, 16, 1, 4, 6)
    image = tiny_pipe("a circle", height=96, width=64, num_inference_steps=2).images[0]
    assert image.size == (64, 96)


def test_t2i_same_seed_same_output(tiny_pipe):
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, output_type="np")
    first = tiny_pipe(**kwargs, generator=_generator(7)).images
    second = tiny_pipe(**kwargs, generator=_generator(7)).images
    other = tiny_pipe(**kwargs, generator=_generator(8)).images
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 1e-3


def test_t2i_batch_and_images_per_prompt(tiny_pipe):
    prompts = ["a red circle", "two blue squares at the bottom"]
    images = tiny_pipe(prompts, height=64, width=64, num_inference_steps=2, num_images_per_prompt=3,
                       output_type="np", generator=_generator()).images
    assert images.shape == (6, 64, 64, 3)
    # Images of one prompt differ from each other (different noise).
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_t2i_batch_row_equals_single_prompt(tiny_pipe):
    generators = [_generator(1), _generator(2)]
    batch = tiny_pipe(["red", "a much longer prompt about a green triangle"], height=64, width=64,
                      num_inference_steps=3, output_type="np", generator=generators).images
    alone = tiny_pipe("red", height=64, width=64, num_inference_steps=3, output_type="np",
                      generator=_generator(1)).images
    np.testing.assert_allclose(batch[0], alone[0], atol=2e-4)


def test_t2i_prompt_changes_output(tiny_pipe):
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    first = tiny_pipe("a red circle", generator=_generator(), **kwargs).images
    second = tiny_pipe("a blue square", generator=_generator(), **kwargs).images
    assert np.abs(first - second).max() > 1e-4


def test_t2i_precomputed_context_matches_prompt(tiny_pipe):
    prompt_context, negative_context = tiny_pipe.encode_prompt("a red circle")
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    from_prompt = tiny_pipe("a red circle", generator=_generator(), **kwargs).images
    from_context = tiny_pipe(prompt_context=prompt_context, negative_prompt_context=negative_context,
                             generator=_generator(), **kwargs).images
    np.testing.assert_allclose(from_prompt, from_context, atol=1e-6)


def test_edit_keeps_aspect_ratio(tiny_edit_pipe, rgb_image):
    image = tiny_edit_pipe(image=rgb_image, prompt="make it red", num_inference_steps=2).images[0]
    assert image.size == (96, 64)


def test_edit_requested_size(tiny_edit_pipe, rgb_image):
    images = tiny_edit_pipe(image=rgb_image, prompt="make it red", height=64, width=64, num_inference_steps=2,
                            output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_edit_same_seed_and_batches(tiny_edit_pipe, rgb_image):
    kwargs = dict(image=rgb_image, num_inference_steps=2, output_type="np")
    first = tiny_edit_pipe(prompt="make it red", generator=_generator(3), **kwargs).images
    second = tiny_edit_pipe(prompt="make it red", generator=_generator(3), **kwargs).images
    np.testing.assert_array_equal(first, second)
    batch = tiny_edit_pipe(prompt=["make it red", "remove the square"], num_images_per_prompt=2, **kwargs).images
    assert batch.shape == (4, 64, 96, 3)


def test_edit_reference_image_changes_output(tiny_edit_pipe, rgb_image):
    kwargs = dict(prompt="make it red", num_inference_steps=2, output_type="np", height=64, width=64)
    first = tiny_edit_pipe(image=rgb_image, generator=_generator(), **kwargs).images
    flipped = rgb_image.transpose(0)
    second = tiny_edit_pipe(image=flipped, generator=_generator(), **kwargs).images
    assert np.abs(first - second).max() > 1e-4


def test_edit_image_guidance_branch_counts(tiny_edit_pipe, rgb_image):
    counter = CallCounter(tiny_edit_pipe.transformer)
    tiny_edit_pipe(image=rgb_image, prompt="make it red", num_inference_steps=1, guidance_interval=(0.0, 1.0),
                   output_type="latent")
    # Full and text-free branches share the reference frames and run as one batch; the image-free one runs alone.
    assert counter.batch_sizes == [2, 1]
    counter.batch_sizes.clear()
    tiny_edit_pipe(image=rgb_image, prompt="make it red", num_inference_steps=1, guidance_scale=1.0,
                   image_guidance_scale=1.0, output_type="latent")
    assert counter.batch_sizes == [1]


@pytest.mark.parametrize("pipeline_cls", [LightBagelPipeline, LightBagelEditPipeline])
def test_save_and_reload_same_output(tiny_components, tmp_path, rgb_image, pipeline_cls):
    pipe = pipeline_cls(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is pipeline_cls

    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="np")
    if pipeline_cls is LightBagelEditPipeline:
        kwargs["image"] = rgb_image
    before = pipe(**kwargs, generator=_generator()).images
    after = loaded(**kwargs, generator=_generator()).images
    np.testing.assert_array_equal(before, after)


def test_ask_equals_plain_vlm(tiny_pipe, rgb_image):
    answer = tiny_pipe.ask("What shape is this?", image=rgb_image, max_new_tokens=6)
    texts = [tiny_pipe.format_vlm_prompt("What shape is this?", with_image=True, add_generation_prompt=True)]
    inputs = tiny_pipe.processor(text=texts, images=[rgb_image], return_tensors="pt")
    inputs = {name: value for name, value in inputs.items() if torch.is_tensor(value)}
    output_ids = tiny_pipe.vlm.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = tiny_pipe.processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert answer == expected
    assert isinstance(tiny_pipe.ask(["one?", "two?"], max_new_tokens=2), list)


def test_ask_ignores_fusion_blocks(tiny_pipe, rgb_image):
    before = tiny_pipe.ask("Describe it.", image=rgb_image, max_new_tokens=6)
    with torch.no_grad():
        for block in tiny_pipe.transformer.fusion_blocks:
            block.understanding.to_out.weight.mul_(100.0)
    assert tiny_pipe.ask("Describe it.", image=rgb_image, max_new_tokens=6) == before


def test_callback_interrupt_returns_partial(tiny_pipe):
    seen = []

    def stop_after_two(pipe, step_index, timestep, callback_kwargs):
        seen.append(step_index)
        if step_index == 1:
            pipe._interrupt = True
        return callback_kwargs

    images = tiny_pipe("a red circle", height=64, width=64, num_inference_steps=6, output_type="np",
                       callback_on_step_end=stop_after_two).images
    assert seen == [0, 1]
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_callback_can_replace_latents(tiny_pipe):
    def zero_latents(pipe, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    latents = tiny_pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="latent",
                        callback_on_step_end=zero_latents).images
    assert torch.count_nonzero(latents) == 0


@pytest.mark.parametrize("pipeline_cls", [LightBagelPipeline, LightBagelEditPipeline])
def test_first_block_cache_in_pipeline(tiny_components, rgb_image, pipeline_cls):
    from diffusers import FirstBlockCacheConfig

    pipe = pipeline_cls(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, output_type="np")
    if pipeline_cls is LightBagelEditPipeline:
        kwargs["image"] = rgb_image
    plain = pipe(**kwargs, generator=_generator()).images
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    cached = pipe(**kwargs, generator=_generator()).images
    np.testing.assert_allclose(cached, plain, atol=1e-6)


def test_from_pipe_keeps_dtypes_and_shares(tiny_components):
    tiny_components["transformer"] = tiny_components["transformer"].to(torch.bfloat16)
    pipe = LightBagelPipeline(**tiny_components)
    edit = LightBagelEditPipeline.from_pipe(pipe)
    assert type(edit) is LightBagelEditPipeline
    assert edit.transformer.dtype == torch.bfloat16
    assert pipe.transformer.dtype == torch.bfloat16
    assert edit.vae.dtype == torch.float32
    first = next(pipe.transformer.parameters())
    assert next(edit.transformer.parameters()).data_ptr() == first.data_ptr()
    assert edit.vlm is pipe.vlm


def test_from_pipe_replaces_component(tiny_components):
    from diffusers_lightbagel.tiny import build_tiny_transformer

    pipe = LightBagelPipeline(**tiny_components)
    other = build_tiny_transformer(seed=5)
    assert LightBagelEditPipeline.from_pipe(pipe, transformer=other).transformer is other
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        LightBagelEditPipeline.from_pipe(pipe, text_encoder=other)
