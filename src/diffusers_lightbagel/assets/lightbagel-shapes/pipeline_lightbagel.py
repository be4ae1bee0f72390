"""Remote-code entry point of a LightBagel repository.

`DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_lightbagel", trust_remote_code=True)` loads
LightBagelPipeline through this file without a prior `import diffusers_lightbagel`. The pipeline code is not in the
repository: this module imports it from the installed diffusers-lightbagel package (`pip install diffusers-lightbagel`).
"""

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


MINIMUM_VERSION = "0.1.0"

try:
    installed_version = version("diffusers-lightbagel")
except PackageNotFoundError as error:
    raise ImportError(
        "This repository contains a LightBagel pipeline, which needs the diffusers-lightbagel package: "
        "run `pip install diffusers-lightbagel>=0.1.0`."
    ) from error
if Version(installed_version) < Version(MINIMUM_VERSION):
    raise ImportError(
        f"This repository was saved by diffusers-lightbagel {MINIMUM_VERSION} but {installed_version} is installed; "
        "run `pip install -U diffusers-lightbagel`."
    )

# diffusers executes every repository's pipeline_lightbagel.py into one shared module object and then takes its only
# DiffusionPipeline subclass, so a class left there by an earlier repository is removed first.
for _name in ['LightBagelEditPipeline', 'LightBagelPipeline']:
    globals().pop(_name, None)

from diffusers_lightbagel import LightBagelPipeline  # noqa: E402


__all__ = ["LightBagelPipeline"]
