"""Training data for LightBagel LoRA fine-tuning: captioned images (text-to-image) and edit triplets."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import PIL.Image
import PIL.ImageOps
import torch

from ..pipelines.image_utils import to_rgb_image


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# Field names accepted in metadata.jsonl, first match wins. `file_name` / `text` are those of Hugging Face `imagefolder`.
IMAGE_FIELDS = ("file_name", "image", "target")
PROMPT_FIELDS = ("text", "caption", "prompt", "instruction")


@dataclass(frozen=True)
class TrainingRecord:
    """One training example: the image to generate, its prompt, and for editing the source image."""

    target: str
    prompt: str
    source: str | None = None


def _first_field(entry: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if isinstance(entry.get(name), str):
            return entry[name]
    return None


def _read_metadata(root: str) -> list[TrainingRecord]:
    path = os.path.join(root, METADATA_FILE)
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: invalid JSON ({error.msg}).") from error
            if not isinstance(entry, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(entry).__name__}.")
            if "source" in entry:
                target, prompt = entry.get("target"), entry.get("instruction")
                if not all(isinstance(value, str) for value in (entry["source"], target, prompt)):
                    raise ValueError(
                        f"{path}, line {line_number}: an edit triplet needs string fields 'source', 'target' and "
                        f"'instruction'; got the fields {sorted(entry)}."
                    )
                records.append(TrainingRecord(target=target, prompt=prompt, source=entry["source"]))
                continue
            target, prompt = _first_field(entry, IMAGE_FIELDS), _first_field(entry, PROMPT_FIELDS)
            if target is None or prompt is None:
                raise ValueError(
                    f"{path}, line {line_number}: a text-to-image entry needs an image field (one of {IMAGE_FIELDS}) "
                    f"and a prompt field (one of {PROMPT_FIELDS}); got the fields {sorted(entry)}."
                )
            records.append(TrainingRecord(target=target, prompt=prompt))
    return records


def _read_captioned_images(root: str) -> list[TrainingRecord]:
    records = []
    for name in sorted(os.listdir(root)):
        stem, extension = os.path.splitext(name)
        if extension.lower() not in IMAGE_EXTENSIONS:
            continue
        caption_path = os.path.join(root, stem + ".txt")
        if not os.path.isfile(caption_path):
            raise ValueError(f"{os.path.join(root, name)} has no caption file; expected {caption_path}.")
        with open(caption_path, encoding="utf-8") as handle:
            records.append(TrainingRecord(target=name, prompt=handle.read().strip()))
    return records


class LightBagelLoraDataset(torch.utils.data.Dataset):
    """Training examples from a folder: `metadata.jsonl`, or image files each with a caption `.txt` of the same stem.

    `metadata.jsonl` contains one JSON object per line, either `{"file_name": ..., "text": ...}` for text-to-image or
    `{"source": ..., "target": ..., "instruction": ...}` for editing. Paths are relative to the folder, and one folder
    contains one kind. Images are center-cropped to a square and resized to `resolution`.
    """

    def __init__(self, root: str | os.PathLike, resolution: int):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"The training data folder {root!r} does not exist.")
        if os.path.isfile(os.path.join(root, METADATA_FILE)):
            records = _read_metadata(root)
        else:
            records = _read_captioned_images(root)

        if not records:
            raise ValueError(
                f"{root!r} contains no training examples: add {METADATA_FILE}, or image files ({', '.join(IMAGE_EXTENSIONS)}) "
                "with a caption .txt file each."
            )
        num_edit = sum(record.source is not None for record in records)
        if 0 < num_edit < len(records):
            raise ValueError(
                f"{root!r} mixes {num_edit} edit triplets with {len(records) - num_edit} text-to-image examples; "
                "train one kind per run."
            )
        missing = [
            path
            for record in records
            for path in (record.target, record.source)
            if path is not None and not os.path.isfile(os.path.join(root, path))
        ]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image files listed in {root!r} do not exist: {missing[:10]}.")

        self.root = root
        self.records = records
        self.resolution = resolution
        self.is_edit = num_edit > 0

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, path: str) -> PIL.Image.Image:
        image = to_rgb_image(os.path.join(self.root, path), "training")
        return PIL.ImageOps.fit(image, (self.resolution, self.resolution), method=PIL.Image.Resampling.BICUBIC)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        example = {"prompt": record.prompt, "target": self._load(record.target)}
        if record.source is not None:
            example["source"] = self._load(record.source)
        return example


def collate_examples(examples: list[dict]) -> dict:
    """Batch examples as lists: the pipeline's encoders take lists of prompts and PIL images."""
    batch = {"prompts": [example["prompt"] for example in examples], "targets": [example["target"] for example in examples]}
    batch["sources"] = [example["source"] for example in examples] if "source" in examples[0] else None
    return batch
