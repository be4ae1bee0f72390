"""Conversion of base models and training checkpoints into LightBagel pipeline folders.

- `convert_base_models`: Qwen2.5-VL + Wan2.2-TI2V-5B (diffusers or Wan release layout) -> initial LightBagel folder
  with zero-initialised fusion blocks.
- `convert_training_checkpoint`: a base LightBagel folder + a training checkpoint -> a new LightBagel folder.
- `main(argv)`: the `lightbagel convert {base,checkpoint}` command.

Each source layout is a `KeyMap` table in `key_maps.py`.
"""

from .base import convert_base_models
from .checkpoint import convert_training_checkpoint
from .command import build_parser, main
from .key_maps import KEY_MAPS, ConversionError, KeyMap, KeyReport, build_target_state_dict, rename_state_dict
from .loaders import load_training_checkpoint
from .writer import ConversionReport


__all__ = [
    "KEY_MAPS",
    "ConversionError",
    "ConversionReport",
    "KeyMap",
    "KeyReport",
    "build_parser",
    "build_target_state_dict",
    "convert_base_models",
    "convert_training_checkpoint",
    "load_training_checkpoint",
    "main",
    "rename_state_dict",
]
