"""The flow-matching loss of LightBagel, computed with the pipeline's own encoders and the transformer."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers.training_utils import compute_density_for_timestep_sampling

from ..pipelines.pipeline_lightbagel import LightBagelPipeline
from ..pipelines.pipeline_lightbagel_edit import LightBagelEditPipeline


class LightBagelFlowMatchingModel(nn.Module):
    """The trained part of a LightBagel pipeline as one module: context encoding and velocity prediction.

    Both steps run inside `forward`, so that `accelerate` wrappers (DDP, FSDP) see every use of the trainable
    weights, including the fusion blocks' understanding halves that run inside the VLM call. The VLM stays frozen.
    It runs with gradients only when a trainable weight sits in an understanding half, because only then does the
    loss depend on weights used inside the VLM call.
    """

    def __init__(self, pipe: LightBagelPipeline, max_sequence_length: int = 512):
        super().__init__()
        self.transformer = pipe.transformer
        self.vlm = pipe.vlm
        # Pipelines are not modules: these attributes hold references, not registered submodules.
        self.pipe = pipe
        self.edit_pipe = LightBagelEditPipeline(**pipe.components)
        self.max_sequence_length = max_sequence_length

    def trains_understanding(self) -> bool:
        return any(
            parameter.requires_grad
            for block in self.transformer.fusion_blocks
            for parameter in block.understanding.parameters()
        )

    def encode_context(self, prompts: list[str], sources: list | None):
        grad = contextlib.nullcontext() if self.trains_understanding() else torch.no_grad()
        with grad:
            if sources is None:
                context, _ = self.pipe.encode_prompt(
                    prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length
                )
            else:
                context, _, _ = self.edit_pipe.encode_prompt(
                    prompts,
                    sources,
                    do_text_guidance=False,
                    do_image_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                )
        return context

    def forward(
        self,
        prompts: list[str],
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        sources: list | None = None,
        reference_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the predicted velocity, (batch, channels, 1, height, width), for `noisy_latents` at `timestep`.

        For editing, `reference_latents` (the clean source image) join as frame 1 with timestep 0, as in
        `LightBagelEditPipeline`, and only frame 0 is returned.
        """
        context = self.encode_context(prompts, sources)
        context = context.to(noisy_latents.device, self.transformer.dtype)
        if reference_latents is None:
            return self.transformer(noisy_latents, timestep, context)[0]

        batch_size = noisy_latents.shape[0]
        _, patch_height, patch_width = self.transformer.config.patch_size
        tokens_per_frame = noisy_latents.shape[-2] * noisy_latents.shape[-1] // (patch_height * patch_width)
        model_input = torch.cat([noisy_latents, reference_latents.to(noisy_latents.dtype)], dim=2)
        per_token_timestep = torch.cat(
            [
                timestep[:, None].expand(batch_size, tokens_per_frame),
                timestep.new_zeros(batch_size, tokens_per_frame),
            ],
            dim=1,
        )
        return self.transformer(model_input, per_token_timestep, context)[0][:, :, :1]


def sample_sigmas(
    batch_size: int,
    shift: float,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample noise levels in (0, 1), 1 being pure noise, shifted towards noise as the scheduler's `shift` does."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, generator=generator
    )
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    model: nn.Module,
    pipe: LightBagelPipeline,
    batch: dict,
    resolution: int,
    shift: float,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the mean squared error between the predicted and the true velocity `noise - x0` for one batch.

    `model` is a `LightBagelFlowMatchingModel`, possibly wrapped by `accelerate`. `batch` comes from
    `collate_examples`. The latents `x0` come from `pipe.encode_image_latents`; the noisy input is
    `(1 - sigma) * x0 + sigma * noise` at timestep `sigma * num_train_timesteps`, as the scheduler steps at inference.
    """
    transformer = pipe.transformer
    device = next(transformer.parameters()).device
    with torch.no_grad():
        latents = pipe.encode_image_latents(batch["targets"], resolution, resolution, device).float()
        reference_latents = None
        if batch["sources"] is not None:
            reference_latents = pipe.encode_image_latents(batch["sources"], resolution, resolution, device)

    noise = torch.randn(latents.shape, generator=generator, device="cpu" if generator else device).to(device)
    sigmas = sample_sigmas(latents.shape[0], shift, weighting_scheme, logit_mean, logit_std, generator).to(device)
    sigmas_5d = sigmas.view(-1, 1, 1, 1, 1)
    noisy_latents = (1 - sigmas_5d) * latents + sigmas_5d * noise
    timestep = sigmas * pipe.scheduler.config.num_train_timesteps

    model_dtype = transformer.dtype
    prediction = model(
        batch["prompts"],
        noisy_latents.to(model_dtype),
        timestep,
        sources=batch["sources"],
        reference_latents=None if reference_latents is None else reference_latents.to(model_dtype),
    )
    target = noise - latents
    return F.mse_loss(prediction.float(), target.float())
