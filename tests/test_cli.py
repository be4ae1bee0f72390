"""The `lightbagel` command line on the embedded tiny model."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_lightbagel.cli import main


def test_generate_writes_image(tmp_path, capsys):
    output = tmp_path / "generated.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "96",
                 "-o", str(output)]) == 0
    with Image.open(output) as image:
        assert image.size == (96, 64)
    captured = capsys.readouterr()
    assert "random" in captured.err
    assert f"wrote {output}" in captured.out


def test_edit_writes_image(tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.full((64, 128, 3), 200, dtype=np.uint8)).save(source)
    output = tmp_path / "edited.png"
    assert main(["edit", "--image", str(source), "--prompt", "make it blue", "--steps", "2", "-o", str(output)]) == 0
    with Image.open(output) as image:
        assert image.size == (128, 64)


def test_ask_prints_answer(tmp_path, capsys):
    source = tmp_path / "source.png"
    Image.fromarray(np.zeros((56, 56, 3), dtype=np.uint8)).save(source)
    assert main(["ask", "--prompt", "what is this?", "--image", str(source), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_existing_output_needs_overwrite(tmp_path):
    output = tmp_path / "taken.png"
    output.write_bytes(b"user data")
    with pytest.raises(SystemExit, match="pass --overwrite"):
        main(["generate", "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "-o", str(output)])
    assert output.read_bytes() == b"user data"


def test_bad_steps_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--steps", "0", "-o", "x.png"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    output = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_lightbagel.cli", "generate", "--prompt", "a circle", "--steps", "1",
         "--height", "32", "--width", "32", "-o", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert output.exists()
