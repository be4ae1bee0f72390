"""Base class of the LightBagel text-to-image and edit pipelines: prompts, context, sizes, latents, loop, decoding."""

import math
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch

from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from ..hub import LightBagelHubMixin
from ..loaders.lora import LightBagelLoraLoaderMixin
from ..models.context import LightBagelContext
from ..models.transformer_lightbagel import LightBagelTransformer2DModel
from ..models.understanding import encode_understanding
from .image_utils import to_rgb_image


logger = logging.get_logger(__name__)

# The largest side accepted for height and width, in pixels. A 16384 x 16384 image is 1M latent tokens.
MAX_IMAGE_SIDE = 16384


class LightBagelPipelineBase(LightBagelHubMixin, DiffusionPipeline, LightBagelLoraLoaderMixin):
    """Shared machinery of `LightBagelPipeline` and `LightBagelEditPipeline`.

    Components:
        vlm: the frozen understanding branch, transformers' `Qwen2_5_VLForConditionalGeneration`.
        processor: its `Qwen2_5_VLProcessor`.
        transformer: `LightBagelTransformer2DModel`, the DiT with the fusion blocks.
        vae: diffusers' `AutoencoderKLWan` (the Wan2.2 VAE).
        scheduler: a flow-matching scheduler, by default `FlowMatchEulerDiscreteScheduler` with `shift=3.0`.
    """

    model_cpu_offload_seq = "vlm->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vlm: Qwen2_5_VLForConditionalGeneration,
        processor: Qwen2_5_VLProcessor,
        transformer: LightBagelTransformer2DModel,
        vae: AutoencoderKLWan,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(vlm=vlm, processor=processor, transformer=transformer, vae=vae, scheduler=scheduler)
        self.vae_scale_factor = vae.config.scale_factor_spatial if vae is not None else 16
        patch_size = transformer.config.patch_size[1] if transformer is not None else 2
        # Image sides must be multiples of the VAE compression times the DiT patch: 16 * 2 = 32 for Wan2.2.
        self.size_multiple = self.vae_scale_factor * patch_size
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.size_multiple)
        self.default_height = self.default_width = 1024
        self._interrupt = False

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """Create this pipeline from another LightBagel pipeline's components, without copying weights.

        Components passed as keyword arguments replace the source's. diffusers' `DiffusionPipeline.from_pipe` casts
        every component of the shared pipeline to float32 unless a dtype is given, which also changes the source
        pipeline's weights. Here each component keeps its dtype unless `dtype` (or `torch_dtype`) is passed.
        """
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            return super().from_pipe(pipeline, **kwargs)
        names = ("vlm", "processor", "transformer", "vae", "scheduler")
        missing = [name for name in names if name not in kwargs and getattr(pipeline, name, None) is None]
        if missing:
            raise ValueError(f"{type(pipeline).__name__} has no {missing}; pass them to from_pipe as keyword arguments.")
        components = {name: kwargs.pop(name) if name in kwargs else getattr(pipeline, name) for name in names}
        if kwargs:
            raise TypeError(f"from_pipe got unexpected keyword arguments {sorted(kwargs)}; allowed: {list(names)}.")
        new_pipeline = cls(**components)
        new_pipeline.register_to_config(_name_or_path=pipeline.config.get("_name_or_path", ""))
        if hasattr(pipeline, "_progress_bar_config"):
            new_pipeline.set_progress_bar_config(**pipeline._progress_bar_config)
        return new_pipeline

    # ------------------------------------------------------------------ properties
    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ------------------------------------------------------------------ prompts and context
    def _vision_placeholder(self) -> str:
        return f"<|vision_start|>{self.processor.image_token}<|vision_end|>"

    def format_vlm_prompt(self, text: str, with_image: bool = False, add_generation_prompt: bool = False) -> str:
        """Wrap `text` in Qwen2.5-VL's chat markup as one user turn, with the image placeholder first."""
        image_part = self._vision_placeholder() if with_image else ""
        prompt = f"<|im_start|>user\n{image_part}{text}<|im_end|>\n"
        if add_generation_prompt:
            prompt += "<|im_start|>assistant\n"
        return prompt

    def _truncate(self, texts: list[str], max_sequence_length: int) -> list[str]:
        tokenizer = self.processor.tokenizer
        truncated = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_sequence_length:
                logger.warning(
                    f"The prompt is {len(ids)} tokens long; only the first {max_sequence_length} "
                    f"(max_sequence_length) are used and {len(ids) - max_sequence_length} are dropped."
                )
                text = tokenizer.decode(ids[:max_sequence_length])
            truncated.append(text)
        return truncated

    def _vlm_device(self) -> torch.device:
        return self._execution_device

    def _run_processor(self, texts: list[str], images, padding_side: str):
        """Call the processor with padding on `padding_side`, leaving the tokenizer's saved padding state as it was.

        The fast tokenizer keeps the last padding setting in its backend, and `save_pretrained` writes it to
        tokenizer.json, so it is restored after each call.
        """
        backend = getattr(self.processor.tokenizer, "backend_tokenizer", None)
        saved_padding = backend.padding if backend is not None else None
        try:
            return self.processor(
                text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt"
            )
        finally:
            if backend is not None:
                if saved_padding is None:
                    backend.no_padding()
                else:
                    backend.enable_padding(**saved_padding)

    def encode_vlm_inputs(self, texts: list[str], images: list[PIL.Image.Image] | None, device: torch.device) -> dict:
        """Tokenize VLM prompts (already in chat markup) and images, right-padded, on `device`."""
        inputs = self._run_processor(texts, images or None, padding_side="right")
        vlm_dtype = self.vlm.dtype
        model_inputs = {}
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(device)
            model_inputs[name] = value.to(vlm_dtype) if value.is_floating_point() else value
        return model_inputs

    def encode_context(
        self, texts: list[str], images: list[PIL.Image.Image] | None = None, device: torch.device | None = None
    ) -> LightBagelContext:
        """Run the VLM once over `texts` (in chat markup) and return the understanding context, one row per text."""
        device = device or self._vlm_device()
        model_inputs = self.encode_vlm_inputs(texts, images, device)
        with self._understanding_halves_on(device):
            return encode_understanding(self.vlm, self.transformer, model_inputs)

    @contextmanager
    def _understanding_halves_on(self, device: torch.device):
        """Move the fusion blocks' understanding halves to `device` for the VLM pass, and back afterwards.

        With model CPU offload the transformer sits on the CPU while the VLM runs, so without the move the
        understanding halves would run on the CPU. Weights on the meta device (sequential offload) are left to
        accelerate's hooks.
        """
        # NOTE: the move has only been run on CPU-only machines, where no move happens.
        halves = [block.understanding for block in self.transformer.fusion_blocks]
        weight = halves[0].to_q.weight if halves else None
        original = None if weight is None else weight.device
        if original is None or original.type == "meta" or original == torch.device(device):
            yield
            return
        for half in halves:
            half.to(device)
        try:
            yield
        finally:
            for half in halves:
                half.to(original)

    # ------------------------------------------------------------------ the understanding task
    @torch.no_grad()
    def ask(
        self,
        question: str | list[str],
        image=None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        **generate_kwargs,
    ) -> str | list[str]:
        """Answer a question about an image, or a plain text prompt, with the VLM alone.

        The fusion blocks are not involved: the answer is exactly what the base VLM generates for the same chat
        prompt, since LightBagel keeps the VLM frozen.
        """
        questions = [question] if isinstance(question, str) else list(question)
        if not questions or not all(isinstance(text, str) for text in questions):
            raise TypeError(f"question must be a string or a non-empty list of strings; got {question!r}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
        images = None
        if image is not None:
            images = [to_rgb_image(item, "question") for item in (image if isinstance(image, list) else [image])]
            if len(images) == 1 and len(questions) > 1:
                images = images * len(questions)
            if len(images) != len(questions):
                raise ValueError(f"Got {len(images)} images for {len(questions)} questions; pass one per question.")
        texts = [self.format_vlm_prompt(text, images is not None, add_generation_prompt=True) for text in questions]
        inputs = self._run_processor(texts, images, padding_side="left")
        inputs = {name: value.to(self._execution_device) for name, value in inputs.items() if torch.is_tensor(value)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.vlm.dtype)
        output_ids = self.vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
        answers = self.processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        self.maybe_free_model_hooks()
        return answers[0] if isinstance(question, str) else answers

    # ------------------------------------------------------------------ input checks
    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer number of pixels; got {value!r}.")
            if value <= 0:
                raise ValueError(f"{name} must be positive; got {value}.")
            if value > MAX_IMAGE_SIDE:
                raise ValueError(f"{name}={value} exceeds the maximum side of {MAX_IMAGE_SIDE} pixels.")
        multiple = self.size_multiple
        new_height = max(multiple, int(round(height / multiple)) * multiple)
        new_width = max(multiple, int(round(width / multiple)) * multiple)
        if (new_height, new_width) != (height, width):
            logger.warning(
                f"height and width must be multiples of {multiple}; generating {new_height}x{new_width} "
                f"(height x width) instead of the requested {height}x{width}."
            )
        return int(new_height), int(new_width)

    @staticmethod
    def _as_prompt_list(prompt, name: str) -> list[str] | None:
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(text, str) for text in prompts):
            raise TypeError(f"{name} must be a string or a list of strings; got {type(prompt).__name__}.")
        if len(prompts) == 0:
            raise ValueError(f"{name} is an empty list; pass at least one prompt.")
        return list(prompts)

    def _check_common(
        self,
        num_inference_steps,
        num_images_per_prompt,
        guidance_interval,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer of at least 1; got {num_inference_steps!r}.")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"num_images_per_prompt must be an integer of at least 1; got {num_images_per_prompt!r}.")
        low, high = guidance_interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1; got {guidance_interval}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs or [] if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )

    @staticmethod
    def _check_scale(name: str, value: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}.")
        return float(value)

    def _check_context(self, context, name: str) -> None:
        if isinstance(context, tuple):
            raise TypeError(
                f"{name} is a tuple, but must be one LightBagelContext. encode_prompt returns one context per "
                "guidance branch; pass them separately, e.g. `prompt_context, negative_prompt_context = "
                "pipe.encode_prompt(...)`."
            )
        if not isinstance(context, LightBagelContext):
            raise TypeError(
                f"{name} must be a LightBagelContext (an element of what encode_prompt returns); "
                f"got {type(context).__name__}."
            )
        if len(context.keys) != len(self.transformer.fusion_blocks):
            raise ValueError(
                f"{name} contains keys for {len(context.keys)} fusion blocks but the transformer has "
                f"{len(self.transformer.fusion_blocks)}; it was encoded with another model."
            )
        tensors = [context.encoder_hidden_states, *context.keys, *context.values]
        if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
            raise ValueError(f"{name} contains NaN or infinite values.")

    @staticmethod
    def _check_generator(generator, batch_size: int):
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images (prompts x "
                "num_images_per_prompt); pass one generator per image or a single generator."
            )

    # ------------------------------------------------------------------ latents
    def _latents_mean_std(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
        return mean, std

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator=None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return (batch, channels, 1, height / 16, width / 16) initial noise, or check and move given `latents`."""
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            1,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor; got {type(latents).__name__}.")
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)} but this batch at {height}x{width} needs {shape}."
            )
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values.")
        return latents.to(device=device, dtype=dtype)

    def encode_image_latents(self, images: list[PIL.Image.Image], height: int, width: int, device) -> torch.Tensor:
        """Encode RGB images, resized to height x width, into normalised VAE latents (batch, channels, 1, h, w)."""
        pixels = self.image_processor.preprocess(images, height=height, width=width)
        pixels = pixels.to(device=device, dtype=self.vae.dtype).unsqueeze(2)
        latents = self.vae.encode(pixels).latent_dist.mode()
        mean, std = self._latents_mean_std(latents.device, latents.dtype)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str):
        """Decode normalised latents to images of `output_type`; "latent" returns them unchanged.

        A VAE in reduced precision that overflows is run again in float32 for this call. Non-finite pixels after
        that raise FloatingPointError instead of producing a black image.
        """
        if output_type == "latent":
            return latents
        mean, std = self._latents_mean_std(latents.device, torch.float32)
        latents = latents.float() * std + mean
        decoded = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        if not torch.isfinite(decoded).all() and self.vae.dtype != torch.float32:
            original_dtype = self.vae.dtype
            logger.warning(f"The VAE overflowed in {original_dtype}; decoding again in float32.")
            self.vae.to(torch.float32)
            try:
                decoded = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
            finally:
                self.vae.to(original_dtype)
        if not torch.isfinite(decoded).all():
            raise FloatingPointError(
                f"The VAE produced NaN or infinite pixels (VAE dtype {self.vae.dtype}, latent range "
                f"[{latents.min().item():.3g}, {latents.max().item():.3g}]); check the latents and the VAE weights."
            )
        return self.image_processor.postprocess(decoded.float(), output_type=output_type)

    # ------------------------------------------------------------------ the denoising loop
    def _run_denoising_loop(
        self,
        latents: torch.Tensor,
        predict_velocity: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
        num_inference_steps: int,
        guidance_interval: tuple[float, float],
        guidance_enabled: bool,
        device: torch.device,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """Integrate the flow from noise to image; `predict_velocity(latents, t, guided)` is called once per step."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        # Decide per step, before the loop, whether the guidance branches run.
        guided_steps = [
            guidance_enabled and guidance_interval[0] <= float(t) / num_train_timesteps <= guidance_interval[1]
            for t in timesteps.tolist()
        ]
        self._interrupt = False
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step_index, t in enumerate(timesteps):
                velocity = predict_velocity(latents, t, guided_steps[step_index])
                latents = self.scheduler.step(velocity.float(), t, latents.float(), return_dict=False)[0].to(
                    latents.dtype
                )

                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
                if self._interrupt:
                    logger.info(f"Stopped by the callback after {step_index + 1} of {len(timesteps)} steps.")
                    break
        return latents

    @staticmethod
    def _callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs):
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return list(callback_on_step_end_tensor_inputs or [])

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool, output_cls) -> Any:
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return output_cls(images=images)
