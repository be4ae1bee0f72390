from .pipeline_lightbagel import LightBagelPipeline
from .pipeline_lightbagel_base import LightBagelPipelineBase
from .pipeline_lightbagel_edit import LightBagelEditPipeline
from .pipeline_output import LightBagelPipelineOutput


__all__ = ["LightBagelEditPipeline", "LightBagelPipeline", "LightBagelPipelineBase", "LightBagelPipelineOutput"]
