from .context import LightBagelContext
from .fusion_attention import LightBagelFusionAttention, LightBagelFusionAttnProcessor, LightBagelFusionBlock
from .layer_map import compute_fusion_layer_map
from .transformer_lightbagel import LightBagelTransformer2DModel, LightBagelTransformerBlock
from .understanding import encode_understanding


__all__ = [
    "LightBagelContext",
    "LightBagelFusionAttention",
    "LightBagelFusionAttnProcessor",
    "LightBagelFusionBlock",
    "LightBagelTransformer2DModel",
    "LightBagelTransformerBlock",
    "compute_fusion_layer_map",
    "encode_understanding",
]
