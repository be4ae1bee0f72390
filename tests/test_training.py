import json
import os
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict
from PIL import Image

from diffusers_lightbagel import LightBagelPipeline
from diffusers_lightbagel.loaders import default_lora_target_modules
from diffusers_lightbagel.tiny import build_tiny_components
from diffusers_lightbagel.training import (
    LightBagelFlowMatchingModel,
    LightBagelLoraDataset,
    collate_examples,
    flow_matching_loss,
    main,
)


RESOLUTION = 64


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    # accelerate keeps one process-wide state, and each training run in this process sets its own mixed precision.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def write_image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(80, 64, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def caption_folder(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    for index in range(2):
        write_image(folder / f"image{index}.png", index)
        (folder / f"image{index}.txt").write_text(f"a striped object number {index}")
    return folder


@pytest.fixture
def edit_folder(tmp_path):
    folder = tmp_path / "edits"
    folder.mkdir()
    lines = []
    for index in range(2):
        write_image(folder / f"source{index}.png", index)
        write_image(folder / f"target{index}.png", index + 10)
        lines.append(json.dumps({"source": f"source{index}.png", "target": f"target{index}.png", "instruction": "invert"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def saved_pipeline(tmp_path):
    folder = tmp_path / "pipeline"
    LightBagelPipeline(**build_tiny_components(seed=0, fusion_init_std=0.05)).save_pretrained(folder)
    return folder


def add_training_lora(pipe, target_modules=None):
    for component in (pipe.vlm, pipe.transformer, pipe.vae):
        component.requires_grad_(False)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=target_modules or default_lora_target_modules())
    pipe.transformer.add_adapter(config)
    pipe.transformer.train()
    return [parameter for parameter in pipe.transformer.parameters() if parameter.requires_grad]


def fixed_batch_loss(model, pipe, batch):
    return flow_matching_loss(model, pipe, batch, RESOLUTION, shift=3.0, generator=torch.Generator().manual_seed(0))


def test_training_steps_lower_loss(tiny_pipe, caption_folder):
    trainable = add_training_lora(tiny_pipe)
    model = LightBagelFlowMatchingModel(tiny_pipe)
    batch = collate_examples([LightBagelLoraDataset(caption_folder, RESOLUTION)[index] for index in range(2)])
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)

    initial = fixed_batch_loss(model, tiny_pipe, batch).item()
    for _ in range(6):
        loss = fixed_batch_loss(model, tiny_pipe, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert fixed_batch_loss(model, tiny_pipe, batch).item() < 0.9 * initial


def test_understanding_lora_receives_gradients(tiny_pipe, caption_folder):
    add_training_lora(tiny_pipe, target_modules=r"^fusion_blocks\.\d+\.understanding\.(to_q|to_k|to_v|to_out)$")
    model = LightBagelFlowMatchingModel(tiny_pipe)
    assert model.trains_understanding()
    batch = collate_examples([LightBagelLoraDataset(caption_folder, RESOLUTION)[0]])
    # lora_B starts at zero, so the gradient reaches lora_B first.
    fixed_batch_loss(model, tiny_pipe, batch).backward()
    grads = [p.grad for n, p in tiny_pipe.transformer.named_parameters() if "understanding" in n and "lora_B" in n]
    assert grads
    assert all(grad is not None and grad.abs().max() > 0 for grad in grads)


def test_edit_triplet_loss_lowers(tiny_pipe, edit_folder):
    trainable = add_training_lora(tiny_pipe)
    model = LightBagelFlowMatchingModel(tiny_pipe)
    dataset = LightBagelLoraDataset(edit_folder, RESOLUTION)
    assert dataset.is_edit
    batch = collate_examples([dataset[0], dataset[1]])
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    initial = fixed_batch_loss(model, tiny_pipe, batch).item()
    for _ in range(4):
        fixed_batch_loss(model, tiny_pipe, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert fixed_batch_loss(model, tiny_pipe, batch).item() < initial


def train_args(pipeline, data, output, *extra):
    return [
        "--pretrained-model", str(pipeline),
        "--train-data-dir", str(data),
        "--output-dir", str(output),
        "--resolution", str(RESOLUTION),
        "--rank", "4",
        "--learning-rate", "1e-2",
        *extra,
    ]  # fmt: skip


def test_main_saves_loadable_lora(saved_pipeline, caption_folder, tmp_path):
    output = tmp_path / "out"
    args = train_args(saved_pipeline, caption_folder, output, "--max-train-steps", "2", "--checkpointing-steps", "1")
    assert main(args + ["--validation-prompt", "a cube", "--validation-steps", "2", "--validation-inference-steps", "2"]) == 0
    assert sorted(os.listdir(output)) == ["checkpoint-1", "checkpoint-2", "pytorch_lora_weights.safetensors", "validation"]
    assert os.listdir(output / "validation") == ["step-000002.png"]

    pipe = LightBagelPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=64, width=64, num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    base = pipe("a cube", generator=torch.Generator().manual_seed(0), **call).images
    pipe.load_lora_weights(output)
    tuned = pipe("a cube", generator=torch.Generator().manual_seed(0), **call).images
    assert (tuned - base).abs().max() > 1e-4


def test_main_lora_alpha_loads_back(saved_pipeline, caption_folder, tmp_path):
    output = tmp_path / "out"
    main(train_args(saved_pipeline, caption_folder, output, "--max-train-steps", "1", "--lora-alpha", "16"))
    call = dict(height=64, width=64, num_inference_steps=2, output_type="latent", guidance_scale=1.0)

    loaded = LightBagelPipeline.from_pretrained(saved_pipeline)
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(output, adapter_name="trained")
    config = loaded.transformer.peft_config["trained"]
    assert config.r == 4
    assert config.lora_alpha == 16
    assert loaded.transformer.blocks[0].attn1.to_q.scaling["trained"] == 4.0

    # The adapter as training built it: the same config, with the weights from the saved file.
    reference = LightBagelPipeline.from_pretrained(saved_pipeline)
    reference.set_progress_bar_config(disable=True)
    training_config = LoraConfig(r=4, lora_alpha=16, target_modules=default_lora_target_modules())
    reference.transformer.add_adapter(training_config, adapter_name="trained")
    weights = LightBagelPipeline.lora_state_dict(output)
    weights = {key.removeprefix("transformer."): value for key, value in weights.items()}
    set_peft_model_state_dict(reference.transformer, weights, adapter_name="trained")

    expected = reference("a cube", generator=torch.Generator().manual_seed(0), **call).images
    actual = loaded("a cube", generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_main_logs_loss_and_final_line(saved_pipeline, caption_folder, tmp_path, capsys):
    output = tmp_path / "out"
    args = train_args(saved_pipeline, caption_folder, output, "--max-train-steps", "2", "--logging-steps", "1")
    assert main(args) == 0
    # splitlines also splits the progress bar's carriage-return updates into separate lines.
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(re.search(r"step 1/2: loss \d+\.\d{4}, learning rate 0\.01$", line) for line in lines)
    assert any(re.search(r"step 2/2: loss \d+\.\d{4}", line) for line in lines)
    assert any("loss=" in line and "steps:" in line for line in lines)
    lora_path = output / "pytorch_lora_weights.safetensors"
    assert lines[-1].endswith(f"Saved the LoRA to {lora_path} after 2 training steps.")


def test_resume_latest_continues_steps(saved_pipeline, caption_folder, tmp_path):
    output = tmp_path / "out"
    main(train_args(saved_pipeline, caption_folder, output, "--max-train-steps", "2", "--checkpointing-steps", "2"))
    main(
        train_args(
            saved_pipeline, caption_folder, output,
            "--max-train-steps", "3", "--checkpointing-steps", "1", "--resume-from-checkpoint", "latest",
        )
    )  # fmt: skip
    # Resuming at step 2 runs only step 3, so no checkpoint-1 appears.
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]


def test_main_trains_on_edit_triplets(saved_pipeline, edit_folder, tmp_path, rgb_image):
    output = tmp_path / "out"
    rgb_image.save(tmp_path / "source.png")
    extra = ["--max-train-steps", "1", "--validation-prompt", "invert", "--validation-image", str(tmp_path / "source.png"),
             "--validation-steps", "1", "--validation-inference-steps", "1", "--mixed-precision", "bf16"]  # fmt: skip
    assert main(train_args(saved_pipeline, edit_folder, output, *extra)) == 0
    assert os.path.isfile(output / "pytorch_lora_weights.safetensors")
    assert os.listdir(output / "validation") == ["step-000001.png"]


def test_existing_lora_file_is_not_overwritten(saved_pipeline, caption_folder, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "pytorch_lora_weights.safetensors").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="--overwrite-output-dir"):
        main(train_args(saved_pipeline, caption_folder, output, "--max-train-steps", "1"))
    assert (output / "pytorch_lora_weights.safetensors").read_bytes() == b"user data"


def test_dataset_missing_caption_is_named(tmp_path):
    write_image(tmp_path / "lonely.png", 0)
    with pytest.raises(ValueError, match="lonely.png has no caption file"):
        LightBagelLoraDataset(tmp_path, RESOLUTION)


def test_dataset_bad_metadata_line_is_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"source": "a.png", "target": "b.png"}) + "\n")
    with pytest.raises(ValueError, match="line 1: an edit triplet needs"):
        LightBagelLoraDataset(tmp_path, RESOLUTION)


def test_dataset_rejects_mixed_kinds(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name, 0)
    lines = [
        json.dumps({"file_name": "a.png", "text": "a"}),
        json.dumps({"source": "b.png", "target": "c.png", "instruction": "edit"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="mixes 1 edit triplets with 1 text-to-image"):
        LightBagelLoraDataset(tmp_path, RESOLUTION)


def test_bad_resolution_rejected_before_loading(caption_folder, tmp_path):
    with pytest.raises(ValueError, match="--resolution must be a multiple of 32"):
        main(train_args(tmp_path / "no-such-pipeline", caption_folder, tmp_path / "out", "--resolution", "50"))
