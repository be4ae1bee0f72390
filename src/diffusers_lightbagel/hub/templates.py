"""The texts `save_pretrained` writes besides the components: pipeline_lightbagel.py, README.md, model_index.json."""

from __future__ import annotations

from typing import Iterable

from huggingface_hub import ModelCardData

from .constants import (
    BASE_MODELS,
    COMPONENT_LIBRARY,
    DEFAULT_LICENSE,
    PACKAGE_NAME,
    PIP_NAME,
    PIPELINE_TASKS,
    REMOTE_CODE_FILENAME,
    REMOTE_CODE_MODULE,
    VERSION_KEY,
    _package_version,
)


def render_remote_code(pipeline_class_name: str, minimum_version: str | None = None) -> str:
    """Return the text of `pipeline_lightbagel.py` for a repository whose pipeline is `pipeline_class_name`.

    The module defines no pipeline code: it imports the class from the installed package, so a repository cannot
    run code other than the package's own. diffusers picks the one `DiffusionPipeline` subclass the module contains,
    so each module exports exactly one.
    """
    if pipeline_class_name not in PIPELINE_TASKS:
        raise ValueError(f"pipeline_class_name must be one of {sorted(PIPELINE_TASKS)}; got {pipeline_class_name!r}.")
    minimum_version = minimum_version or _package_version()
    return f'''"""Remote-code entry point of a LightBagel repository.

`DiffusionPipeline.from_pretrained(repo, custom_pipeline="{REMOTE_CODE_MODULE}", trust_remote_code=True)` loads
{pipeline_class_name} through this file without a prior `import {PACKAGE_NAME}`. The pipeline code is not in the
repository: this module imports it from the installed {PIP_NAME} package (`pip install {PIP_NAME}`).
"""

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


MINIMUM_VERSION = "{minimum_version}"

try:
    installed_version = version("{PIP_NAME}")
except PackageNotFoundError as error:
    raise ImportError(
        "This repository contains a LightBagel pipeline, which needs the {PIP_NAME} package: "
        "run `pip install {PIP_NAME}>={minimum_version}`."
    ) from error
if Version(installed_version) < Version(MINIMUM_VERSION):
    raise ImportError(
        f"This repository was saved by {PIP_NAME} {{MINIMUM_VERSION}} but {{installed_version}} is installed; "
        "run `pip install -U {PIP_NAME}`."
    )

# diffusers executes every repository's {REMOTE_CODE_FILENAME} into one shared module object and then takes its only
# DiffusionPipeline subclass, so a class left there by an earlier repository is removed first.
for _name in {sorted(PIPELINE_TASKS)!r}:
    globals().pop(_name, None)

from {PACKAGE_NAME} import {pipeline_class_name}  # noqa: E402


__all__ = ["{pipeline_class_name}"]
'''


def render_model_card(
    pipeline_class_name: str,
    repo_id: str,
    base_model: Iterable[str] | None = None,
    license: str | None = None,
) -> str:
    """Return the README.md model card of a repository holding a `pipeline_class_name` pipeline at `repo_id`."""
    if pipeline_class_name not in PIPELINE_TASKS:
        raise ValueError(f"pipeline_class_name must be one of {sorted(PIPELINE_TASKS)}; got {pipeline_class_name!r}.")
    base_models = list(BASE_MODELS if base_model is None else base_model)
    card_data = ModelCardData(
        library_name="diffusers",
        license=license or DEFAULT_LICENSE,
        base_model=base_models,
        pipeline_tag=PIPELINE_TASKS[pipeline_class_name],
        tags=["diffusers", PIP_NAME, "lightbagel", "text-to-image", "image-to-image"],
    )
    if pipeline_class_name == "LightBagelEditPipeline":
        call = (
            'from diffusers.utils import load_image\n\n'
            'image = pipe(image=load_image("input.png"), prompt="make the sky orange").images[0]'
        )
    else:
        call = 'image = pipe("a red circle to the left of a blue square").images[0]'
    body = f"""
# LightBagel ({pipeline_class_name})

A LightBagel pipeline for diffusers: a frozen Qwen2.5-VL understanding branch and a Wan2.2 diffusion transformer
joined by fusion attention blocks. Both text-to-image (`LightBagelPipeline`) and instruction editing
(`LightBagelEditPipeline`) run on these weights.

## Usage

Install the plugin with `pip install {PIP_NAME}`, then:

```py
import torch
from {PACKAGE_NAME} import {pipeline_class_name}

pipe = {pipeline_class_name}.from_pretrained(
    "{repo_id}", dtype={{"default": torch.bfloat16, "vae": torch.float32}}
).to("cuda")
{call}
```

Other ways to load the same repository:

- `import {PACKAGE_NAME}` and then `diffusers.DiffusionPipeline.from_pretrained("{repo_id}")`.
- Without importing the plugin (it must still be installed):
  `DiffusionPipeline.from_pretrained("{repo_id}", custom_pipeline="{REMOTE_CODE_MODULE}", trust_remote_code=True)`.
  Without the import and without these two arguments diffusers raises
  `AttributeError: module diffusers has no attribute {pipeline_class_name}`.
- The other task on the same components: `LightBagelEditPipeline.from_pipe(pipe)` or
  `LightBagelPipeline.from_pipe(pipe)`.

## Base models

{chr(10).join(f"- [{name}](https://huggingface.co/{name})" for name in base_models)}
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


# ---------------------------------------------------------------------------------------------------- model index
def normalize_model_index(model_index: dict, pipeline_class_name: str) -> dict:
    """Return `model_index` with LightBagel classes recorded as `["diffusers", class]` and the package version."""
    normalized = dict(model_index)
    normalized["_class_name"] = pipeline_class_name
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        library, class_name = entry
        if isinstance(library, str) and library.split(".")[0] == PACKAGE_NAME:
            normalized[name] = [COMPONENT_LIBRARY, class_name]
    normalized[VERSION_KEY] = _package_version()
    return normalized

