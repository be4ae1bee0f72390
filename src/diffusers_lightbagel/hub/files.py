"""Writing files and folders atomically, and merging a staged save into an existing folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from diffusers.utils import logging

from .constants import MODEL_CARD_FILENAME


logger = logging.get_logger(__name__)


def current_umask() -> int:
    """Return the process umask without leaving it changed.

    Linux reports it in /proc/self/status. Elsewhere it is read by setting it and setting it back at once, so a file
    that another thread creates in between gets umask 0o022.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_file_mode(umask: int | None = None) -> int:
    """Return the mode `open(path, "w")` gives a new file: 0o666 without the umask bits."""
    return 0o666 & ~(current_umask() if umask is None else umask)


def default_folder_mode(umask: int | None = None) -> int:
    """Return the mode `os.mkdir` gives a new folder: 0o777 without the umask bits."""
    return 0o777 & ~(current_umask() if umask is None else umask)


def make_staging_folder(target: Path) -> Path:
    """Create an empty folder `.<name>.staging-<random>` next to `target`, with the mode of a normal new folder.

    `tempfile.mkdtemp` creates folders with mode 0o700, which would make a folder renamed into place private.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name.lstrip('.')}.staging-"))
    os.chmod(staged, default_folder_mode())
    return staged


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, so readers never see a partial file.

    The file gets the mode a plain write would leave: that of the file it replaces, or 0o666 without the umask bits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else default_file_mode()
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0o600.
        os.fchmod(handle, mode)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _same_content(first: Path, second: Path) -> bool:
    if first.stat().st_size != second.stat().st_size:
        return False
    digests = []
    for path in (first, second):
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        digests.append(digest.digest())
    return digests[0] == digests[1]


# Fields that `from_pretrained` adds to config files and that `save_pretrained` then writes back: where a config was
# loaded from and with which dtype (transformers also writes `dtype` into nested sub-configs). They do not change
# the saved model, so two config files that differ only in them count as the same.
LOAD_TIME_CONFIG_FIELDS = frozenset({"_name_or_path", "dtype", "is_local", "local_files_only"})


def _without_load_time_fields(value):
    if isinstance(value, dict):
        return {
            key: _without_load_time_fields(item) for key, item in value.items() if key not in LOAD_TIME_CONFIG_FIELDS
        }
    if isinstance(value, list):
        return [_without_load_time_fields(item) for item in value]
    return value


def _same_config(first: Path, second: Path) -> bool:
    try:
        with open(first, encoding="utf-8") as file:
            first_config = json.load(file)
        with open(second, encoding="utf-8") as file:
            second_config = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return _without_load_time_fields(first_config) == _without_load_time_fields(second_config)


def _equivalent_files(staged: Path, existing: Path) -> bool:
    """Return whether `existing` can stay in place of `staged`: same bytes, or JSON equal up to load-time fields."""
    if _same_content(staged, existing):
        return True
    return staged.suffix == ".json" and _same_config(staged, existing)


def _weight_file_pattern(variant: str | None) -> re.Pattern:
    """Match the weight and index files diffusers and transformers write for one variant (or none)."""
    tag = re.escape(f".{variant}") if variant else ""
    return re.compile(
        rf"^(diffusion_pytorch_model|model|pytorch_model)({tag}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)"
        rf"|\.(safetensors|bin)\.index{tag}\.json)$"
    )


def _merge_staged_folder(staged: Path, target: Path, overwrite: bool, variant: str | None) -> None:
    """Move every file of `staged` into `target`, each with an atomic `os.replace`.

    A file that exists in `target` with other content is replaced only with `overwrite=True`, and then stale weight
    shards of the same variant are removed, so a repository never mixes two shardings. Without `overwrite=True`,
    a README.md the user already has is kept, and so are files equivalent to the new ones (see `_equivalent_files`).
    """
    staged_files = _relative_files(staged)
    unchanged = set()
    conflicts = []
    for name in staged_files:
        existing = target / name
        if name == MODEL_CARD_FILENAME or not existing.is_file():
            continue
        if _equivalent_files(staged / name, existing):
            unchanged.add(name)
        else:
            conflicts.append(name)
    if conflicts and not overwrite:
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise FileExistsError(
            f"{target} already contains different versions of {shown}; pass overwrite=True to replace them, or "
            "save to an empty folder."
        )

    if overwrite:
        pattern = _weight_file_pattern(variant)
        staged_set = set(staged_files)
        for component_folder in {Path(name).parent for name in staged_files if Path(name).parent != Path(".")}:
            existing = target / component_folder
            if not existing.is_dir():
                continue
            for path in existing.iterdir():
                relative = str(component_folder / path.name)
                if path.is_file() and pattern.match(path.name) and relative not in staged_set:
                    logger.info(f"Removing {relative} from {target}: it belongs to an earlier sharding.")
                    path.unlink()

    for name in staged_files:
        destination = target / name
        if name == MODEL_CARD_FILENAME and destination.is_file() and not overwrite:
            logger.info(f"Keeping the existing {destination}; pass overwrite=True to replace it with a new card.")
            continue
        if name in unchanged and not overwrite:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, destination)

