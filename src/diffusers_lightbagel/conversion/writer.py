"""Writing a converted pipeline folder atomically, and the report of what it holds."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusers.utils import logging

from .key_maps import ConversionError, KeyReport


logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)
_VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_dtype(name: str, option: str = "--dtype") -> torch.dtype | None:
    """Return the torch dtype for `name`, or None for "auto" (keep the source's dtype)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"Invalid {option} {name!r}; allowed: {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[name]


def validate_variant(variant: str | None) -> None:
    if variant is not None and not _VARIANT_PATTERN.match(variant):
        raise ConversionError(
            f"Invalid --variant {variant!r}: it becomes part of file names (model.<variant>.safetensors), so use only "
            "letters, digits, '_' and '-', e.g. bf16 or fp16."
        )


def check_output_path(output: Path, overwrite: bool) -> None:
    """Raise before any heavy work if `output` exists and `overwrite` is not set, or cannot be created."""
    if output.exists() and not overwrite:
        raise ConversionError(f"The output {output} already exists; pass --overwrite to replace it.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"The output {output} exists and is not a folder; remove it or choose another path.")
    parent = output.parent
    if not parent.is_dir():
        raise ConversionError(f"The parent folder {parent} of the output does not exist.")


@contextmanager
def atomic_output_folder(output: Path, overwrite: bool):
    """Yield a temporary folder next to `output`, moved into place only when the block finishes without error.

    The temporary folder sits in the same parent folder, so the final move is a rename on one file system. On error
    it is deleted and `output` is left as it was.
    """
    check_output_path(output, overwrite)
    temporary = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    previous = None
    if output.exists():
        # os.replace cannot replace a non-empty folder, so the old output steps aside first.
        previous = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, previous)
    try:
        os.replace(temporary, output)
    except OSError:
        if previous is not None:
            os.replace(previous, output)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@dataclass
class ComponentReport:
    name: str
    class_name: str
    num_parameters: int
    dtypes: dict[str, int]


@dataclass
class ConversionReport:
    """Summary of one conversion: the output, each component's size and dtype, and the key accounting."""

    output: Path
    components: list[ComponentReport] = field(default_factory=list)
    keys: dict[str, KeyReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"Wrote {self.output}"]
        for component in self.components:
            dtypes = ", ".join(f"{name} ({count:,} parameters)" for name, count in component.dtypes.items())
            lines.append(
                f"  {component.name}: {component.class_name}, {component.num_parameters:,} parameters, {dtypes or '-'}"
            )
        for name, keys in self.keys.items():
            lines.append(
                f"  {name} keys ({keys.key_map}): {keys.loaded} loaded, {len(keys.from_base)} from the base folder, "
                f"{len(keys.reinitialised)} re-initialised, {len(keys.dropped)} dropped"
            )
            for key, reason in sorted(keys.dropped.items()):
                lines.append(f"    dropped {key}: {reason}")
            for key, reason in sorted(keys.reinitialised.items()):
                if not key.startswith("fusion_blocks."):
                    lines.append(f"    re-initialised {key}: {reason}")
            fusion = [key for key in keys.reinitialised if key.startswith("fusion_blocks.")]
            if fusion:
                lines.append(f"    initialised {len(fusion)} fusion block tensors (output projections at zero)")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def describe_component(name: str, component) -> ComponentReport:
    """Count the parameters of a model component per dtype; other components count as 0."""
    dtypes: Counter = Counter()
    if isinstance(component, torch.nn.Module):
        for parameter in component.parameters():
            dtypes[str(parameter.dtype).removeprefix("torch.")] += parameter.numel()
    return ComponentReport(name, type(component).__name__, sum(dtypes.values()), dict(dtypes))


def most_common_float_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """Return the floating dtype holding the most elements, the dtype a source "is in"."""
    counts: Counter = Counter()
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters to `dtype`, keeping the model's `_keep_in_fp32_modules` in float32.

    diffusers' `from_pretrained(dtype=...)` keeps those modules in float32 too, so storing them in float32
    loses no precision that loading would restore.
    """
    keep_in_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        keep = dtype != torch.float32 and any(module in name.split(".") for module in keep_in_fp32)
        tensor.data = tensor.data.to(torch.float32 if keep else dtype)
    return model
