"""The shapes demo: a small LightBagel trained on synthetic shapes, its data generator and ShapesEval.

The shipped model (`DEMO_MODEL_DIR`) draws one to three circles, squares and triangles in six colours on a 64 x 64
canvas from captions such as "a red circle to the left of a blue square", and edits such scenes from instructions
such as "make the circle blue". Its VLM is the tiny random Qwen2.5-VL of `diffusers_lightbagel.tiny`, kept frozen;
the VAE, the DiT and the fusion blocks were trained by `diffusers_lightbagel.demo.train`.
"""

from __future__ import annotations

import os


DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "lightbagel-shapes")
# Sampling settings the ShapesEval numbers in docs/shapes_eval.md were measured with.
DEMO_IMAGE_SIZE = 64
DEMO_NUM_INFERENCE_STEPS = 20
DEMO_GUIDANCE_SCALE = 3.0
DEMO_EDIT_GUIDANCE_SCALE = 2.0


def load_demo_pipeline(edit: bool = False, model_dir: str | None = None):
    """Load the shipped shapes model as a `LightBagelPipeline`, or as a `LightBagelEditPipeline` with `edit=True`.

    `model_dir` replaces the shipped folder, for a model rebuilt by `scripts/build_demo_model.sh`. The returned
    pipeline generates 64 x 64 images by default.
    """
    import diffusers

    import diffusers_lightbagel  # noqa: F401  (registers the LightBagel classes with diffusers)

    from ..pipelines.pipeline_lightbagel_edit import LightBagelEditPipeline

    folder = model_dir or DEMO_MODEL_DIR
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(
            f"No pipeline folder at {folder!r} (model_index.json is missing); rebuild the demo model with "
            "`bash scripts/build_demo_model.sh`."
        )
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    if edit:
        pipe = LightBagelEditPipeline.from_pipe(pipe)
    pipe.default_height = pipe.default_width = DEMO_IMAGE_SIZE
    return pipe


__all__ = ["DEMO_MODEL_DIR", "load_demo_pipeline"]
