"""Input handling of the pipelines: bad input fails early with a clear message; awkward valid input works."""

import io
import logging
import math

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers.utils import logging as diffusers_logging
from diffusers_lightbagel.pipelines.image_utils import to_rgb_image


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def log_records():
    """Collect diffusers_lightbagel log messages (diffusers loggers do not propagate to the root logger)."""
    records = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = ListHandler(level=logging.WARNING)
    logger = diffusers_logging.get_logger("diffusers_lightbagel")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


FAST = dict(num_inference_steps=1, output_type="np")


# ----------------------------------------------------------------------------- sizes
def test_size_rounded_with_one_warning(tiny_pipe, log_records):
    images = tiny_pipe("a circle", height=70, width=100, **FAST).images
    assert images.shape == (1, 64, 96, 3)
    size_warnings = [message for message in log_records if "multiples of 32" in message]
    assert len(size_warnings) == 1
    assert "64x96" in size_warnings[0]
    assert "70x100" in size_warnings[0]


@pytest.mark.parametrize("height, width, message", [
    (0, 64, "height must be positive; got 0"),
    (64, -32, "width must be positive; got -32"),
    (64, 10**6, "width=1000000 exceeds the maximum side"),
    (64.5, 64, "height must be an integer"),
])
def test_invalid_size_rejected(tiny_pipe, height, width, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_pipe("a circle", height=height, width=width, **FAST)


def test_tiny_size_rounds_up_to_one_patch(tiny_pipe):
    assert tiny_pipe("a circle", height=8, width=8, **FAST).images.shape == (1, 32, 32, 3)


def test_edit_one_side_keeps_aspect_ratio(tiny_edit_pipe):
    image = PIL.Image.new("RGB", (128, 64), (10, 20, 30))
    assert tiny_edit_pipe(image=image, prompt="x", width=256, **FAST).images.shape == (1, 128, 256, 3)


# ----------------------------------------------------------------------------- images
def _rgb_array(height=64, width=96):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_pil_modes_become_rgb(mode):
    base = PIL.Image.fromarray(_rgb_array())
    if mode == "I;16":
        image = PIL.Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    else:
        image = base.convert(mode)
    converted = to_rgb_image(image)
    assert converted.mode == "RGB"
    assert converted.size == (96, 64)


def test_transparent_pixels_become_white():
    image = PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_brightness():
    image = PIL.Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_applied(tmp_path):
    image = PIL.Image.fromarray(_rgb_array(32, 64))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert to_rgb_image(str(path)).size == (32, 64)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_arrays_in_either_range(scale):
    array = _rgb_array().astype(np.float32) / 255.0 * scale
    from_numpy = to_rgb_image(array)
    from_torch = to_rgb_image(torch.from_numpy(array).permute(2, 0, 1))
    expected = _rgb_array()
    assert np.abs(np.asarray(from_numpy, dtype=int) - expected).max() <= 1
    assert np.abs(np.asarray(from_torch, dtype=int) - expected).max() <= 1


@pytest.mark.parametrize("bad, message", [
    (np.zeros((6, 4, 5)), "1, 3 or 4 channels"),
    (np.full((4, 4, 3), np.nan), "NaN or infinite"),
    (np.full((4, 4, 3), -3.0), r"\[0, 1\] or \[0, 255\]"),
    (12, "must be a PIL image, a file path"),
    ("/no/such/file.png", "does not exist"),
])
def test_bad_images_rejected(bad, message):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        to_rgb_image(bad)


def test_edit_image_and_prompt_counts_must_match(tiny_edit_pipe):
    images = [PIL.Image.new("RGB", (64, 64))] * 3
    with pytest.raises(ValueError, match="Got 3 images for 2 prompts"):
        tiny_edit_pipe(image=images, prompt=["a", "b"], **FAST)


def test_edit_list_of_images_with_prompts(tiny_edit_pipe, tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.fromarray(_rgb_array()).save(path)
    images = [str(path), _rgb_array().astype(np.float32) / 255.0]
    out = tiny_edit_pipe(image=images, prompt=["make it red", "make it blue"], **FAST).images
    assert out.shape == (2, 64, 96, 3)


def test_edit_without_image_rejected(tiny_edit_pipe):
    with pytest.raises(ValueError, match="needs an image to edit"):
        tiny_edit_pipe(prompt="make it red", **FAST)


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("prompt", ["", "un cercle rouge à gauche", "赤い円", "🔴 next to 🟦"])
def test_unusual_prompts_generate(tiny_pipe, prompt):
    images = tiny_pipe(prompt, height=32, width=32, **FAST).images
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


def test_long_prompt_truncated_with_warning(tiny_pipe, log_records):
    long_prompt = "a red circle " * 20
    truncated = tiny_pipe(long_prompt, height=32, width=32, max_sequence_length=16, generator=_generator(),
                          **FAST).images
    expected_tokens = len(tiny_pipe.processor.tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert any(f"{expected_tokens} tokens long" in m and f"{expected_tokens - 16} are dropped" in m for m in log_records)
    prefix = tiny_pipe.processor.tokenizer.decode(
        tiny_pipe.processor.tokenizer(long_prompt, add_special_tokens=False)["input_ids"][:16]
    )
    reference = tiny_pipe(prefix, height=32, width=32, generator=_generator(), **FAST).images
    np.testing.assert_allclose(truncated, reference, atol=1e-6)


def test_padding_does_not_change_a_prompts_image(tiny_pipe):
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    alone = tiny_pipe("A", generator=[_generator(5)], **kwargs).images[0]
    batch = tiny_pipe(["A", "B is a much longer prompt than A, with many more tokens"],
                      generator=[_generator(5), _generator(6)], **kwargs).images[0]
    np.testing.assert_allclose(alone, batch, atol=2e-4)


@pytest.mark.parametrize("prompt, error", [(None, ValueError), (3, TypeError), ([], ValueError), (["a", 2], TypeError)])
def test_bad_prompt_types_rejected(tiny_pipe, prompt, error):
    with pytest.raises(error):
        tiny_pipe(prompt, **FAST)


def test_negative_prompt_count_must_match(tiny_pipe):
    with pytest.raises(ValueError, match="Got 3 negative prompts for 2 prompts"):
        tiny_pipe(["a", "b"], negative_prompt=["x", "y", "z"], **FAST)


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_step_counts_rejected(tiny_pipe, steps):
    with pytest.raises(ValueError, match="num_inference_steps must be an integer of at least 1"):
        tiny_pipe("a", num_inference_steps=steps, output_type="np")


@pytest.mark.parametrize("scale", [math.nan, math.inf, "4"])
def test_non_finite_guidance_rejected(tiny_pipe, scale):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        tiny_pipe("a", guidance_scale=scale, **FAST)


def test_guidance_below_one_runs_one_branch(tiny_pipe):
    batch_sizes = []
    handle = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    tiny_pipe("a", height=32, width=32, guidance_scale=0.5, num_inference_steps=2, output_type="np")
    handle.remove()
    assert batch_sizes == [1, 1]


def test_nan_latents_rejected(tiny_pipe):
    latents = torch.zeros(1, 16, 1, 2, 2)
    latents[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents contain NaN or infinite values"):
        tiny_pipe("a", height=32, width=32, latents=latents, **FAST)


def test_wrong_latent_shape_rejected(tiny_pipe):
    with pytest.raises(ValueError, match=r"latents have shape \(1, 16, 1, 4, 4\)"):
        tiny_pipe("a", height=32, width=32, latents=torch.zeros(1, 16, 1, 4, 4), **FAST)


def test_nan_context_rejected(tiny_pipe):
    context, negative = tiny_pipe.encode_prompt("a")
    context.keys[0][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="prompt_context contains NaN or infinite values"):
        tiny_pipe(prompt_context=context, negative_prompt_context=negative, height=32, width=32, **FAST)


def test_generator_list_length_checked(tiny_pipe):
    with pytest.raises(ValueError, match="list of 3 generators for 4 images"):
        tiny_pipe(["a", "b"], num_images_per_prompt=2, generator=[_generator()] * 3, height=32, width=32, **FAST)


def test_prompt_and_context_exclusive(tiny_pipe):
    context, _ = tiny_pipe.encode_prompt("a", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_context"):
        tiny_pipe("a", prompt_context=context, **FAST)


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 1.0), (0.0, 1.5)])
def test_bad_guidance_interval_rejected(tiny_pipe, interval):
    with pytest.raises(ValueError, match="guidance_interval must satisfy"):
        tiny_pipe("a", guidance_interval=interval, **FAST)


def test_bad_output_type_rejected(tiny_pipe):
    with pytest.raises(ValueError, match="output_type must be one of"):
        tiny_pipe("a", num_inference_steps=1, output_type="jpeg")


def test_errors_come_before_vlm_call(tiny_pipe):
    calls = []
    handle = tiny_pipe.vlm.register_forward_pre_hook(lambda module, args: calls.append(1))
    for kwargs in (dict(height=0), dict(num_inference_steps=0), dict(guidance_scale=math.nan)):
        with pytest.raises(ValueError):
            tiny_pipe("a", **{"num_inference_steps": 1, **kwargs})
    handle.remove()
    assert calls == []


# ----------------------------------------------------------------------------- precision
def test_nan_output_is_an_error(tiny_pipe):
    with torch.no_grad():
        tiny_pipe.vae.post_quant_conv.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite pixels"):
        tiny_pipe("a", height=32, width=32, **FAST)


def test_float16_transformer_with_float32_vae(tiny_components):
    from diffusers_lightbagel import LightBagelPipeline

    tiny_components["transformer"] = tiny_components["transformer"].to(torch.float16)
    tiny_components["vlm"] = tiny_components["vlm"].to(torch.float16)
    pipe = LightBagelPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()


def test_float16_vae_is_decoded_in_float32(tiny_components, log_records):
    from diffusers_lightbagel import LightBagelPipeline

    tiny_components["vae"] = tiny_components["vae"].to(torch.float16)
    pipe = LightBagelPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a", height=32, width=32, num_inference_steps=1, output_type="latent").images
    # Latents far outside the usual range overflow a float16 VAE; the pipeline decodes in float32 instead.
    latents = torch.randn(latents.shape, generator=_generator()) * 1e5
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode(latents.half()).sample).all()
    images = pipe.decode_latents(latents, "np")
    assert np.isfinite(images).all()
    assert any("decoding again in float32" in message for message in log_records)
    assert pipe.vae.dtype == torch.float16


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_image_across_calls(tiny_pipe):
    first = tiny_pipe("a", height=32, width=32, generator=_generator(11), num_inference_steps=2, output_type="np").images
    second = tiny_pipe("a", height=32, width=32, generator=_generator(11), num_inference_steps=2, output_type="np").images
    np.testing.assert_array_equal(first, second)


def test_context_tuple_rejected_with_hint(tiny_pipe):
    contexts = tiny_pipe.encode_prompt("a")
    with pytest.raises(TypeError, match="prompt_context is a tuple"):
        tiny_pipe(prompt_context=contexts, height=32, width=32, **FAST)


def test_processor_padding_state_unchanged(tiny_pipe):
    backend = tiny_pipe.processor.tokenizer.backend_tokenizer
    before = backend.padding
    tiny_pipe.ask(["one?", "a longer question?"], max_new_tokens=1)
    tiny_pipe(["a", "bb"], height=32, width=32, **FAST)
    assert backend.padding == before
