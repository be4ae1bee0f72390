from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from diffusers.utils import BaseOutput


@dataclass
class LightBagelPipelineOutput(BaseOutput):
    """Output of the LightBagel pipelines.

    Attributes:
        images: PIL images, a (batch, height, width, 3) numpy array, a (batch, 3, height, width) tensor, or the
            (batch, channels, 1, height / 16, width / 16) latents when `output_type="latent"`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
