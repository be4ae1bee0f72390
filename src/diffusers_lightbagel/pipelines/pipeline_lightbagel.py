"""LightBagelPipeline: text-to-image generation."""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusers.utils import logging

from ..models.context import LightBagelContext
from .guidance import combine_guidance
from .pipeline_lightbagel_base import LightBagelPipelineBase
from .pipeline_output import LightBagelPipelineOutput


logger = logging.get_logger(__name__)


class LightBagelPipeline(LightBagelPipelineBase):
    """Text-to-image generation with LightBagel.

    The VLM reads the prompt once per call, with all guidance branches in one batch. Every denoising step then runs
    only the DiT and the generation halves of the fusion blocks, against the cached understanding context.

    Example:
        ```py
        >>> import torch
        >>> import diffusers_lightbagel  # registers the LightBagel classes with diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/lightbagel", dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a red circle to the left of a blue square", num_inference_steps=50).images[0]
        ```
    """

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
    ) -> tuple[LightBagelContext, LightBagelContext | None]:
        """Return the contexts of the prompts and, with guidance, of the negative prompts, from one VLM call."""
        prompts = self._as_prompt_list(prompt, "prompt")
        negatives = self._as_prompt_list(negative_prompt, "negative_prompt") or [""]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or one each.")
        texts = self._truncate(prompts, max_sequence_length)
        if do_classifier_free_guidance:
            texts += self._truncate(negatives, max_sequence_length)
        context = self.encode_context([self.format_vlm_prompt(text) for text in texts], device=device)
        num_prompts = len(prompts)
        prompt_context = context.select(list(range(num_prompts))).trim()
        if not do_classifier_free_guidance:
            return prompt_context, None
        negative_context = context.select(list(range(num_prompts, 2 * num_prompts))).trim()
        return prompt_context, negative_context

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] = (0.4, 1.0),
        guidance_renorm_min: float | None = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_context: LightBagelContext | None = None,
        negative_prompt_context: LightBagelContext | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        batch_guidance_branches: bool = True,
    ) -> LightBagelPipelineOutput | tuple:
        """Generate images from text.

        Args:
            prompt: the prompt or prompts. Not needed when `prompt_context` is given.
            negative_prompt: what text guidance steers away from; the empty prompt by default.
            height, width: output size in pixels, rounded to multiples of 32 with a warning; 1024 by default.
            num_inference_steps: denoising steps, at least 1.
            guidance_scale: text guidance scale; at or below 1 guidance is off and the negative branch is not run.
            guidance_interval: (low, high) noise levels, in [0, 1] with 1 pure noise, between which guidance runs.
            guidance_renorm_min: rescale the guided velocity to at most the conditional velocity's norm, shrinking
                it by no more than this factor; None turns renormalisation off.
            num_images_per_prompt, generator, latents, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as in other diffusers pipelines. A callback stops the loop by
                setting `pipe._interrupt = True`; the images made so far are decoded and returned.
            prompt_context, negative_prompt_context: contexts from `encode_prompt`, in place of the prompts.
            attention_kwargs: passed to the transformer; `{"scale": s}` sets the LoRA scale.
            max_sequence_length: prompts longer than this many tokens are truncated with a warning.
            batch_guidance_branches: run the conditional and negative branches as one batch (faster) or one after
                the other (less memory).
        """
        # 1. Check inputs
        self._check_common(
            num_inference_steps, num_images_per_prompt, guidance_interval, output_type, callback_on_step_end_tensor_inputs
        )
        guidance_scale = self._check_scale("guidance_scale", guidance_scale)
        do_guidance = guidance_scale > 1.0
        if (prompt is None) == (prompt_context is None):
            raise ValueError("Pass exactly one of prompt and prompt_context.")
        if prompt_context is not None:
            self._check_context(prompt_context, "prompt_context")
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        height, width = self._check_size(height, width)
        device = self._execution_device

        # 2. Understanding context: one VLM call for every prompt and guidance branch
        if prompt_context is None:
            prompt_context, negative_prompt_context = self.encode_prompt(
                prompt, negative_prompt, do_guidance, max_sequence_length, device
            )
        elif do_guidance and negative_prompt_context is None:
            _, negative_prompt_context = self.encode_prompt(
                [""] * prompt_context.batch_size, None, True, max_sequence_length, device
            )
        self._check_context(prompt_context, "prompt_context")
        batch_size = prompt_context.batch_size * num_images_per_prompt
        self._check_generator(generator, batch_size)

        dtype = self.transformer.dtype
        conditional = self.transformer.prepare_context(
            prompt_context.repeat_interleave(num_images_per_prompt).to(device, dtype)
        )
        unconditional = both = None
        if do_guidance:
            self._check_context(negative_prompt_context, "negative_prompt_context")
            if negative_prompt_context.batch_size != prompt_context.batch_size:
                raise ValueError(
                    f"negative_prompt_context has batch size {negative_prompt_context.batch_size} but "
                    f"prompt_context has {prompt_context.batch_size}."
                )
            unconditional = self.transformer.prepare_context(
                negative_prompt_context.repeat_interleave(num_images_per_prompt).to(device, dtype)
            )
            if batch_guidance_branches:
                both = LightBagelContext.cat([conditional, unconditional])

        # 3. Latents
        latents = self.prepare_latents(batch_size, height, width, dtype, device, generator, latents)

        # 4. Denoising loop
        def run(latents: torch.Tensor, t: torch.Tensor, context: LightBagelContext, name: str) -> torch.Tensor:
            # cache_context names the guidance branch for diffusers' caching hooks (First Block Cache).
            with self.transformer.cache_context(name):
                timestep = t.expand(latents.shape[0])
                return self.transformer(latents, timestep, context, attention_kwargs=attention_kwargs)[0]

        def predict_velocity(latents: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
            if not guided:
                return run(latents, t, conditional, "cond")
            if both is not None:
                cond, uncond = run(torch.cat([latents, latents]), t, both, "cond_uncond").chunk(2)
            else:
                cond = run(latents, t, conditional, "cond")
                uncond = run(latents, t, unconditional, "uncond")
            return combine_guidance(cond, uncond, guidance_scale, renorm_min=guidance_renorm_min)

        latents = self._run_denoising_loop(
            latents,
            predict_velocity,
            num_inference_steps,
            guidance_interval,
            do_guidance,
            device,
            callback_on_step_end,
            self._callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs),
        )

        # 5. Decode
        return self._finish(latents, output_type, return_dict, LightBagelPipelineOutput)
