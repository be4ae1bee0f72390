"""Saving, loading and sharing LightBagel pipelines on the Hugging Face Hub.

A LightBagel repository is an ordinary diffusers pipeline folder (`model_index.json` plus one folder per component)
with two additions written by `LightBagelHubMixin.save_pretrained`:

- `pipeline_lightbagel.py`, a small module that re-exports the saved pipeline class from the installed
  `diffusers_lightbagel` package. diffusers loads it only when asked to, with
  `DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_lightbagel", trust_remote_code=True)`, which
  lets a process that never imported `diffusers_lightbagel` load the pipeline.
- `README.md`, a model card with the library name, task tags, base models, license and a usage snippet.

How diffusers 0.42 resolves the names in `model_index.json`, which decides the layout:

- a string `_class_name` is looked up as an attribute of the `diffusers` module. Importing `diffusers_lightbagel`
  registers the LightBagel classes there, so `DiffusionPipeline.from_pretrained(repo)` works after that import and
  raises `AttributeError: module diffusers has no attribute LightBagelPipeline` without it. diffusers offers no
  hook to change that message.
- a list `_class_name` (`["pipeline_lightbagel", "LightBagelPipeline"]`) would route every load through remote code,
  even `LightBagelPipeline.from_pretrained`, so it would require `trust_remote_code=True` everywhere. The string
  form is written instead.
- a component entry `[library, class]` is resolved by importing `library` and looking up both the class and
  diffusers' base classes (`ModelMixin`, ...) on it. `["diffusers_lightbagel", "LightBagelTransformer2DModel"]` fails
  that lookup because the package's top level does not export `ModelMixin`. `["diffusers",
  "LightBagelTransformer2DModel"]` resolves through the registration above and does not depend on the module path of
  the class, so the transformer entry is saved in that form.

Modules: `constants` (file names and card metadata), `templates` (the texts of pipeline_lightbagel.py, README.md and
model_index.json), `files` (atomic writes and merging a staged save), `validation` (the repository check) and `mixin`
(`LightBagelHubMixin`).
"""

from __future__ import annotations

from .constants import (
    BASE_MODELS,
    COMPONENT_LIBRARY,
    COMPONENT_NAMES,
    DEFAULT_LICENSE,
    MODEL_CARD_FILENAME,
    MODEL_INDEX_FILENAME,
    PACKAGE_NAME,
    PICKLE_SUFFIXES,
    PIP_NAME,
    PIPELINE_TASKS,
    REMOTE_CODE_FILENAME,
    REMOTE_CODE_MODULE,
    VERSION_KEY,
)
from .files import write_text_atomic
from .mixin import LightBagelHubMixin
from .templates import normalize_model_index, render_model_card, render_remote_code
from .validation import LightBagelRepositoryError, validate_repository


__all__ = [
    "BASE_MODELS",
    "COMPONENT_LIBRARY",
    "COMPONENT_NAMES",
    "DEFAULT_LICENSE",
    "MODEL_CARD_FILENAME",
    "MODEL_INDEX_FILENAME",
    "PACKAGE_NAME",
    "PICKLE_SUFFIXES",
    "PIP_NAME",
    "PIPELINE_TASKS",
    "REMOTE_CODE_FILENAME",
    "REMOTE_CODE_MODULE",
    "VERSION_KEY",
    "LightBagelHubMixin",
    "LightBagelRepositoryError",
    "normalize_model_index",
    "render_model_card",
    "render_remote_code",
    "validate_repository",
    "write_text_atomic",
]
