import os

# No test may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_lightbagel import LightBagelEditPipeline, LightBagelPipeline  # noqa: E402
from diffusers_lightbagel.tiny import build_tiny_components  # noqa: E402


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_components():
    """Tiny components whose fusion blocks have non-zero outputs, so the fusion path has an effect."""
    return build_tiny_components(seed=0, fusion_init_std=0.05)


@pytest.fixture
def tiny_pipe(tiny_components):
    pipe = LightBagelPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_edit_pipe(tiny_components):
    pipe = LightBagelEditPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def rgb_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8))
