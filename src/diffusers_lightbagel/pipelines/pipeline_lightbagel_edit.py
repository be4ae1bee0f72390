"""LightBagelEditPipeline: image editing from an instruction."""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusers.utils import logging

from ..models.context import LightBagelContext
from .guidance import combine_guidance
from .image_utils import size_keeping_aspect_ratio, to_rgb_image
from .pipeline_lightbagel_base import LightBagelPipelineBase
from .pipeline_output import LightBagelPipelineOutput


logger = logging.get_logger(__name__)


class LightBagelEditPipeline(LightBagelPipelineBase):
    """Instruction-based image editing with LightBagel.

    The input image reaches the model twice: through the ViT, inside the VLM prompt, and through the VAE, as clean
    reference latents that join the DiT sequence as a second frame with timestep 0 (the noisy target is frame 0).
    Only the target frame is denoised and returned. The pipeline keeps one reference image per prompt; several
    reference images per prompt are not supported.

    Guidance has three branches. The full context is the conditional branch. Text guidance compares it with the
    image and the negative (by default empty) instruction. Image guidance compares it with the instruction alone,
    without ViT tokens or reference latents.

    Example:
        ```py
        >>> import diffusers_lightbagel
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/lightbagel-edit")
        >>> edited = pipe(image=load_image("cat.png"), prompt="make the cat orange").images[0]
        ```
    """

    default_max_area = 1024 * 1024

    def encode_prompt(
        self,
        prompt: str | list[str],
        image,
        negative_prompt: str | list[str] | None = None,
        do_text_guidance: bool = True,
        do_image_guidance: bool = True,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
    ) -> tuple[LightBagelContext, LightBagelContext | None, LightBagelContext | None]:
        """Return the full, text-free and image-free contexts (the last two only when their guidance is on)."""
        prompts = self._as_prompt_list(prompt, "prompt")
        images = self._as_image_list(image, len(prompts))
        negatives = self._as_prompt_list(negative_prompt, "negative_prompt") or [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or one each.")
        prompts = self._truncate(prompts, max_sequence_length)
        negatives = self._truncate(negatives, max_sequence_length)

        texts = [self.format_vlm_prompt(text, with_image=True) for text in prompts]
        vlm_images = list(images)
        if do_text_guidance:
            texts += [self.format_vlm_prompt(text, with_image=True) for text in negatives]
            vlm_images += images
        if do_image_guidance:
            texts += [self.format_vlm_prompt(text, with_image=False) for text in prompts]
        context = self.encode_context(texts, vlm_images, device=device)

        num_prompts = len(prompts)
        groups = iter(range(0, len(texts), num_prompts))
        full = context.select(list(range(next(groups), num_prompts))).trim()
        text_free = image_free = None
        if do_text_guidance:
            start = next(groups)
            text_free = context.select(list(range(start, start + num_prompts))).trim()
        if do_image_guidance:
            start = next(groups)
            image_free = context.select(list(range(start, start + num_prompts))).trim()
        return full, text_free, image_free

    @staticmethod
    def _as_image_list(image, num_prompts: int) -> list:
        if image is None:
            raise ValueError("LightBagelEditPipeline needs an image to edit; pass image=...")
        items = image if isinstance(image, (list, tuple)) else [image]
        if len(items) == 0:
            raise ValueError("image is an empty list; pass one image, or one per prompt.")
        images = [to_rgb_image(item, "edit") for item in items]
        if len(images) == 1:
            images = images * num_prompts
        if len(images) != num_prompts:
            raise ValueError(f"Got {len(images)} images for {num_prompts} prompts; pass one image, or one per prompt.")
        return images

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        image_guidance_scale: float = 2.0,
        guidance_interval: tuple[float, float] = (0.4, 1.0),
        guidance_renorm_min: float | None = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_context: LightBagelContext | None = None,
        negative_prompt_context: LightBagelContext | None = None,
        image_free_context: LightBagelContext | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        batch_guidance_branches: bool = True,
    ) -> LightBagelPipelineOutput | tuple:
        """Edit images following instructions.

        Args:
            image: the image to edit (PIL image, file path, array or tensor), or one per prompt.
            prompt: the instruction or instructions. Not needed when `prompt_context` is given.
            height, width: output size. By default the output has the input's aspect ratio and area, at most
                1024 x 1024, with sides that are multiples of 32.
            guidance_scale: text guidance scale; at or below 1 the text-free branch is not run.
            image_guidance_scale: image guidance scale; at or below 1 the image-free branch is not run.
            prompt_context, negative_prompt_context, image_free_context: contexts from `encode_prompt` in place of
                the prompts; `image` is still needed for the reference latents.
            Other arguments: as in `LightBagelPipeline.__call__`.
        """
        # 1. Check inputs
        self._check_common(
            num_inference_steps, num_images_per_prompt, guidance_interval, output_type, callback_on_step_end_tensor_inputs
        )
        text_scale = self._check_scale("guidance_scale", guidance_scale)
        image_scale = self._check_scale("image_guidance_scale", image_guidance_scale)
        do_text_guidance, do_image_guidance = text_scale > 1.0, image_scale > 1.0
        if (prompt is None) == (prompt_context is None):
            raise ValueError("Pass exactly one of prompt and prompt_context.")
        if prompt_context is not None:
            self._check_context(prompt_context, "prompt_context")
        num_prompts = len(self._as_prompt_list(prompt, "prompt")) if prompt is not None else prompt_context.batch_size
        images = self._as_image_list(image, num_prompts)
        if height is None and width is None:
            height, width = size_keeping_aspect_ratio(*images[0].size, self.default_max_area, self.size_multiple)
        elif height is None or width is None:
            # One side given: the other follows the input's aspect ratio.
            input_width, input_height = images[0].size
            if height is None:
                height = max(1, round(width * input_height / input_width)) if width > 0 else width
            else:
                width = max(1, round(height * input_width / input_height)) if height > 0 else height
        height, width = self._check_size(height, width)
        device = self._execution_device

        # 2. Understanding context: one VLM call for every prompt and guidance branch
        if prompt_context is None:
            prompt_context, negative_prompt_context, image_free_context = self.encode_prompt(
                prompt, images, negative_prompt, do_text_guidance, do_image_guidance, max_sequence_length, device
            )
        self._check_context(prompt_context, "prompt_context")
        for name, needed, context in (
            ("negative_prompt_context", do_text_guidance, negative_prompt_context),
            ("image_free_context", do_image_guidance, image_free_context),
        ):
            if needed:
                if context is None:
                    raise ValueError(f"{name} is needed for this guidance setting when prompt_context is given.")
                self._check_context(context, name)
        batch_size = num_prompts * num_images_per_prompt
        self._check_generator(generator, batch_size)

        dtype = self.transformer.dtype

        def prepare(context: LightBagelContext | None) -> LightBagelContext | None:
            if context is None:
                return None
            return self.transformer.prepare_context(context.repeat_interleave(num_images_per_prompt).to(device, dtype))

        full, text_free, image_free = prepare(prompt_context), prepare(negative_prompt_context), prepare(image_free_context)
        full_and_text_free = LightBagelContext.cat([full, text_free]) if text_free is not None else None

        # 3. Latents: the noisy target (frame 0) and the clean reference (frame 1, timestep 0)
        reference = self.encode_image_latents(images, height, width, device).to(dtype)
        reference = reference.repeat_interleave(num_images_per_prompt, dim=0)
        latents = self.prepare_latents(batch_size, height, width, dtype, device, generator, latents)
        tokens_per_frame = latents.shape[-2] * latents.shape[-1] // (
            self.transformer.config.patch_size[1] * self.transformer.config.patch_size[2]
        )

        # The reference frames for one and for two guidance branches, built once for the whole loop.
        references = {batch_size: reference, 2 * batch_size: torch.cat([reference, reference])}

        def run_with_reference(latents, t, context, name: str):
            model_input = torch.cat([latents, references[latents.shape[0]]], dim=2)
            # Per-token timesteps: t for the target frame, 0 for the clean reference frame.
            timestep = torch.cat(
                [t.expand(model_input.shape[0], tokens_per_frame), t.new_zeros(model_input.shape[0], tokens_per_frame)],
                dim=1,
            )
            # cache_context names the guidance branch for diffusers' caching hooks (First Block Cache).
            with self.transformer.cache_context(name):
                output = self.transformer(model_input, timestep, context, attention_kwargs=attention_kwargs)[0]
            return output[:, :, :1]

        # 4. Denoising loop
        def predict_velocity(latents: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
            if not guided:
                return run_with_reference(latents, t, full, "cond")
            if text_free is not None and batch_guidance_branches:
                conditional, text_unconditional = run_with_reference(
                    torch.cat([latents, latents]), t, full_and_text_free, "cond_text_free"
                ).chunk(2)
            else:
                conditional = run_with_reference(latents, t, full, "cond")
                text_unconditional = None
                if text_free is not None:
                    text_unconditional = run_with_reference(latents, t, text_free, "text_free")
            image_unconditional = None
            if image_free is not None:
                with self.transformer.cache_context("image_free"):
                    timestep = t.expand(latents.shape[0])
                    image_unconditional = self.transformer(
                        latents, timestep, image_free, attention_kwargs=attention_kwargs
                    )[0]
            return combine_guidance(
                conditional, text_unconditional, text_scale, image_unconditional, image_scale, guidance_renorm_min
            )

        latents = self._run_denoising_loop(
            latents,
            predict_velocity,
            num_inference_steps,
            guidance_interval,
            do_text_guidance or do_image_guidance,
            device,
            callback_on_step_end,
            self._callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs),
        )

        # 5. Decode
        return self._finish(latents, output_type, return_dict, LightBagelPipelineOutput)
