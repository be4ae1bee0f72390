"""Regenerate the repository skeletons in this folder: `python pipelines/generate.py`.

Each subfolder holds the files a Hub repository of that LightBagel variant needs besides the weights. The tiny
variant is written by saving the pipeline built by `diffusers_lightbagel.tiny` and dropping its weight files; the
full-size variant is written from the configs below, with models built on the meta device so nothing is allocated.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from diffusers_lightbagel import LightBagelPipeline, LightBagelTransformer2DModel
from diffusers_lightbagel.hub import (
    MODEL_CARD_FILENAME,
    MODEL_INDEX_FILENAME,
    REMOTE_CODE_FILENAME,
    normalize_model_index,
    render_model_card,
    render_remote_code,
)
from diffusers_lightbagel.tiny import build_tiny_components


HERE = Path(__file__).resolve().parent
FULL_SIZE_NAME = "lightbagel-7b"
TINY_NAME = "lightbagel-tiny"
WEIGHT_FILE = re.compile(r"\.(safetensors|bin)$|\.safetensors\.index(\.[A-Za-z0-9_]+)?\.json$")

# Wan2.2-TI2V-5B DiT shapes with the text projection re-sized to the Qwen2.5-VL-7B width (3584) and the VLM's 28
# decoder layers for the fusion layer map.
FULL_SIZE_TRANSFORMER_CONFIG = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": 3584,
    "freq_dim": 256,
    "ffn_dim": 14336,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "rope_max_seq_len": 1024,
    "vlm_hidden_size": 3584,
    "vlm_num_layers": 28,
}

# The Wan2.2 VAE config, with the per-channel latent statistics, as diffusers' conversion script
# (scripts/convert_wan_to_diffusers.py, `vae22_diffusers_config`) writes it for Wan-AI/Wan2.2-TI2V-5B. That config
# also sets `clip_output: false`, a field AutoencoderKLWan of diffusers 0.42.1 does not accept, so it is left out.
FULL_SIZE_VAE_CONFIG = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
    "latents_mean": [
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
        -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
        -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
        -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
        0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],  # fmt: skip
    "latents_std": [
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
        0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
        0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
        0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
        0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],  # fmt: skip
}

FULL_SIZE_SCHEDULER_CONFIG = {"shift": 3.0}

# The VLM and its processor are Qwen/Qwen2.5-VL-7B-Instruct unchanged; their files are copied from that repository.
FULL_SIZE_MODEL_INDEX = {
    "_class_name": "LightBagelPipeline",
    "vlm": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "processor": ["transformers", "Qwen2_5_VLProcessor"],
    "transformer": ["diffusers", "LightBagelTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_full_size(folder: Path) -> None:
    """Write the full-size repository skeleton (configs, model index, remote code, model card) into `folder`."""
    with torch.device("meta"):
        transformer = LightBagelTransformer2DModel.from_config(FULL_SIZE_TRANSFORMER_CONFIG)
        vae = AutoencoderKLWan.from_config(FULL_SIZE_VAE_CONFIG)
    transformer.save_config(folder / "transformer")
    vae.save_config(folder / "vae")
    FlowMatchEulerDiscreteScheduler.from_config(FULL_SIZE_SCHEDULER_CONFIG).save_config(folder / "scheduler")
    _write_json(folder / MODEL_INDEX_FILENAME, normalize_model_index(FULL_SIZE_MODEL_INDEX, "LightBagelPipeline"))
    (folder / REMOTE_CODE_FILENAME).write_text(render_remote_code("LightBagelPipeline"), encoding="utf-8")
    card = render_model_card("LightBagelPipeline", f"your-org/{FULL_SIZE_NAME}")
    (folder / MODEL_CARD_FILENAME).write_text(card, encoding="utf-8")


def write_tiny(folder: Path) -> None:
    """Write every file of a saved tiny pipeline except its weights into `folder`."""
    pipeline = LightBagelPipeline(**build_tiny_components(seed=0))
    with tempfile.TemporaryDirectory() as temporary:
        saved = Path(temporary) / TINY_NAME
        pipeline.save_pretrained(saved, repo_id=f"your-org/{TINY_NAME}", base_model=[])
        for path in sorted(saved.rglob("*")):
            if path.is_file() and not WEIGHT_FILE.search(path.name):
                destination = folder / path.relative_to(saved)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)


def generate(root: Path = HERE) -> None:
    for name, writer in ((FULL_SIZE_NAME, write_full_size), (TINY_NAME, write_tiny)):
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        writer(folder)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
