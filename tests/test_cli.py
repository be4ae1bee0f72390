"""The `lightbagel` command line on the embedded tiny model."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import torch

from diffusers_lightbagel import cli
from diffusers_lightbagel.cli import main


ORIGINAL_LOAD_PIPELINE = cli.load_pipeline


def test_generate_writes_image(tmp_path, capsys):
    output = tmp_path / "generated.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "96",
                 "-o", str(output)]) == 0
    with Image.open(output) as image:
        assert image.size == (96, 64)
    captured = capsys.readouterr()
    assert "embedded shapes demo" in captured.err
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


def test_existing_output_needs_overwrite(tmp_path, capsys):
    output = tmp_path / "taken.png"
    output.write_bytes(b"user data")
    assert main(["generate", "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "-o", str(output)]) == 1
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert output.read_bytes() == b"user data"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_pipeline", fail)


@pytest.mark.parametrize("arguments, message", [
    (["edit", "--image", "missing.png", "--prompt", "x", "-o", "{tmp}/out.png"], "'missing.png' does not exist"),
    (["generate", "--prompt", "x", "-o", "{tmp}/out.webp2"], "extension '.webp2', which PIL cannot write"),
    (["generate", "--prompt", "x", "-o", "{tmp}/no/such/folder/out.png"], "does not exist"),
    (["generate", "--prompt", "x", "--model", "./no-such-folder", "-o", "{tmp}/out.png"], "neither an existing folder"),
])
def test_bad_arguments_fail_before_loading(tmp_path, capsys, no_model_load, arguments, message):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    if "--model" in arguments:
        # This case must reach load_pipeline's own check, so restore the real function.
        cli.load_pipeline = ORIGINAL_LOAD_PIPELINE
    assert main(arguments) == 1
    assert message in capsys.readouterr().err


def test_cuda_without_gpu_rejected(tmp_path, capsys, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["generate", "--prompt", "x", "--device", "cuda", "-o", str(tmp_path / "out.png")]) == 1
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_non_finite_guidance_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--guidance-scale", "nan", "-o", "x.png"])
    assert "must be a finite number, got nan" in capsys.readouterr().err


def test_control_characters_escaped():
    assert cli._printable("a\x1b[2Jb\nc\x00") == "a\\x1b[2Jb\nc\\x00"


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


@pytest.mark.parametrize(("command", "demo_guidance"), [("generate", "3"), ("edit", "2")])
def test_help_states_each_default_once(command, demo_guidance, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: 0)" in text  # --seed, added by the formatter
    assert f"(default: 4; {demo_guidance} for the embedded demo)" in text
    assert "for its edits" not in text
