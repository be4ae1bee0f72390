"""Names and defaults shared by the Hub modules: file names, model_index.json keys and model card metadata."""

from __future__ import annotations


COMPONENT_NAMES = ("vlm", "processor", "transformer", "vae", "scheduler")
REMOTE_CODE_MODULE = "pipeline_lightbagel"
REMOTE_CODE_FILENAME = f"{REMOTE_CODE_MODULE}.py"
MODEL_INDEX_FILENAME = "model_index.json"
MODEL_CARD_FILENAME = "README.md"
# model_index.json key that records the diffusers-lightbagel version that wrote the repository.
VERSION_KEY = "_diffusers_lightbagel_version"
# The library under which LightBagel classes are recorded in model_index.json (see the docstring of
# `diffusers_lightbagel.hub`).
COMPONENT_LIBRARY = "diffusers"
PACKAGE_NAME = "diffusers_lightbagel"
PIP_NAME = "diffusers-lightbagel"

BASE_MODELS = ("Qwen/Qwen2.5-VL-7B-Instruct", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")
# The model card's license unless the caller passes `license=`.
DEFAULT_LICENSE = "apache-2.0"
PIPELINE_TASKS = {"LightBagelPipeline": "text-to-image", "LightBagelEditPipeline": "image-to-image"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _package_version() -> str:
    # Imported here because this module is imported while the package itself is being initialised.
    from .. import __version__

    return __version__

