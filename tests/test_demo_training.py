"""The demo model's training command: learning-rate schedules, argument checks and a short resumed run."""

import logging
import math

import pytest
import torch

from diffusers_lightbagel.demo import DEMO_MODEL_DIR, load_demo_pipeline
from diffusers_lightbagel.demo.train import main, scheduled_learning_rate


@pytest.fixture
def restore_process_state():
    """Undo what the command sets for the whole process: the package logger's level and handlers, torch threads."""
    package_logger = logging.getLogger("diffusers_lightbagel")
    level, handlers, threads = package_logger.level, list(package_logger.handlers), torch.get_num_threads()
    yield
    package_logger.setLevel(level)
    package_logger.handlers[:] = handlers
    torch.set_num_threads(threads)


def test_constant_schedule_warms_up_then_holds():
    assert scheduled_learning_rate(1, 1000, 1e-3, 200, "constant") == pytest.approx(5e-6)
    assert scheduled_learning_rate(200, 1000, 1e-3, 200, "constant") == pytest.approx(1e-3)
    assert scheduled_learning_rate(1000, 1000, 1e-3, 200, "constant") == pytest.approx(1e-3)


def test_cosine_schedule_decays_to_zero():
    values = [scheduled_learning_rate(step, 1000, 1e-3, 200, "cosine") for step in range(1, 1001)]
    assert values[499] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    after_warmup = values[199:]
    assert all(later <= earlier for earlier, later in zip(after_warmup, after_warmup[1:]))


def test_schedule_rejects_unknown_name():
    with pytest.raises(ValueError, match="'linear'"):
        scheduled_learning_rate(1, 10, 1e-3, 0, "linear")


def test_train_rejects_negative_warmup(tmp_path):
    with pytest.raises(SystemExit, match="--warmup-steps must be at least 0; got -1"):
        main(["--output", str(tmp_path / "model"), "--warmup-steps", "-1"])


def test_train_resumes_shipped_model_with_cosine(tmp_path, restore_process_state):
    output = tmp_path / "model"
    argv = [
        "--output", str(output), "--stage", "transformer", "--resume-from", DEMO_MODEL_DIR,
        "--steps", "2", "--batch-size", "2", "--num-captions", "4", "--num-edits", "4",
        "--lr-schedule", "cosine", "--warmup-steps", "1", "--save-every", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    pipe = load_demo_pipeline(model_dir=str(output))
    shipped = load_demo_pipeline()
    trained = dict(pipe.transformer.named_parameters())
    changed = [
        name
        for name, parameter in shipped.transformer.named_parameters()
        if not parameter.data.equal(trained[name].data)
    ]
    assert changed, "two training steps left every transformer weight unchanged"
    assert pipe.vae.state_dict().keys() == shipped.vae.state_dict().keys()
