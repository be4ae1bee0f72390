"""LightBagel for Diffusers: a frozen Qwen2.5-VL and a Wan2.2 DiT joined by zero-initialised fusion attention.

Importing this package registers its pipeline and model classes with the `diffusers` namespace, so that
`diffusers.DiffusionPipeline.from_pretrained` can resolve the class names written in a LightBagel
`model_index.json`.
"""

import diffusers as _diffusers

from .models import LightBagelContext, LightBagelFusionBlock, LightBagelTransformer2DModel
from .pipelines import LightBagelEditPipeline, LightBagelPipeline, LightBagelPipelineOutput


__version__ = "0.1.0"

_PUBLIC_CLASSES = (LightBagelPipeline, LightBagelEditPipeline, LightBagelTransformer2DModel)


def _register_with_diffusers() -> None:
    # DiffusionPipeline.from_pretrained looks a model_index.json "_class_name" up as an attribute of `diffusers`.
    for cls in _PUBLIC_CLASSES:
        setattr(_diffusers, cls.__name__, cls)


_register_with_diffusers()

__all__ = [
    "LightBagelContext",
    "LightBagelEditPipeline",
    "LightBagelFusionBlock",
    "LightBagelPipeline",
    "LightBagelPipelineOutput",
    "LightBagelTransformer2DModel",
]
