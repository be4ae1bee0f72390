"""Classifier-free guidance as in the BAGEL lineage: text guidance, image guidance, an interval and renormalisation."""

from __future__ import annotations

import torch


def guidance_active(sigma: float, guidance_interval: tuple[float, float]) -> bool:
    """Return whether guidance applies at noise level `sigma` (1 is pure noise, 0 is the clean image)."""
    low, high = guidance_interval
    return low <= sigma <= high


def combine_guidance(
    conditional: torch.Tensor,
    text_unconditional: torch.Tensor | None,
    text_scale: float,
    image_unconditional: torch.Tensor | None = None,
    image_scale: float = 1.0,
    renorm_min: float | None = 0.0,
) -> torch.Tensor:
    """Combine the guidance branches' velocity predictions.

    Text guidance moves away from the prediction without the prompt text. Image guidance (editing only) then moves
    the text-guided prediction away from the prediction without the reference image. With `renorm_min` set, the
    result is rescaled so that its norm per sample does not exceed the conditional prediction's, and shrinks by no
    more than the factor `renorm_min`.
    """
    guided = conditional
    if text_unconditional is not None:
        guided = text_unconditional + text_scale * (conditional - text_unconditional)
    if image_unconditional is not None:
        guided = image_unconditional + image_scale * (guided - image_unconditional)
    if renorm_min is not None and guided is not conditional:
        dims = tuple(range(1, conditional.ndim))
        conditional_norm = torch.linalg.vector_norm(conditional.float(), dim=dims, keepdim=True)
        guided_norm = torch.linalg.vector_norm(guided.float(), dim=dims, keepdim=True)
        ratio = (conditional_norm / guided_norm.clamp_min(1e-12)).clamp(min=renorm_min, max=1.0)
        guided = (guided.float() * ratio).to(conditional.dtype)
    return guided
