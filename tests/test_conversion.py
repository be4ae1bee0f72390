"""Conversion of base models and training checkpoints into LightBagel pipeline folders, on tiny models."""

import copy
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

import diffusers_lightbagel  # noqa: F401  (registers the LightBagel classes with diffusers)
from diffusers import DiffusionPipeline, WanTransformer3DModel
from diffusers_lightbagel import LightBagelContext, LightBagelPipeline, LightBagelTransformer2DModel
from diffusers_lightbagel.conversion import ConversionError, convert_base_models, convert_training_checkpoint, main
from diffusers_lightbagel.tiny import (
    build_tiny_components,
    build_tiny_processor,
    build_tiny_transformer,
    build_tiny_vae,
    build_tiny_vlm,
)


WAN_TEXT_DIM = 24  # differs from the tiny VLM width (32), so the text projection cannot be copied
TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=WAN_TEXT_DIM,
    freq_dim=16,
    ffn_dim=48,
    num_layers=2,
    rope_max_seq_len=256,
)
# The Wan release config.json fields for the same tiny DiT.
TINY_WAN_RELEASE_CONFIG = {
    "model_type": "ti2v",
    "dim": 24,
    "num_heads": 2,
    "ffn_dim": 48,
    "freq_dim": 16,
    "num_layers": 2,
    "in_dim": 16,
    "out_dim": 16,
    "text_len": 512,
    "eps": 1e-6,
}

# diffusers name -> Wan release name, for the DiT. In the release, norm3 is the cross-attention norm.
RELEASE_DIT_NAMES = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
)
# diffusers name -> Wan2.2 release name, for the VAE (tiny VAE: one residual block per level).
RELEASE_VAE_NAMES = (
    (r"(resnets\.\d+)\.norm1\.", r"\1.residual.0."),
    (r"(resnets\.\d+)\.conv1\.", r"\1.residual.2."),
    (r"(resnets\.\d+)\.norm2\.", r"\1.residual.3."),
    (r"(resnets\.\d+)\.conv2\.", r"\1.residual.6."),
    (r"(resnets\.\d+)\.conv_shortcut\.", r"\1.shortcut."),
    (r"\.mid_block\.resnets\.0\.", ".middle.0."),
    (r"\.mid_block\.attentions\.0\.", ".middle.1."),
    (r"\.mid_block\.resnets\.1\.", ".middle.2."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", r"encoder.downsamples.\1.downsamples.1."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", r"decoder.upsamples.\1.upsamples.2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
)


def to_release_names(state_dict, rules):
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor.clone()
    assert len(renamed) == len(state_dict)
    return renamed


def assert_state_dicts_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def leftovers(folder: Path) -> list[str]:
    markers = (".tmp-", ".old-", ".staging-")
    return sorted(path.name for path in folder.iterdir() if any(marker in path.name for marker in markers))


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(3)
    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


@pytest.fixture(scope="module")
def vae():
    return build_tiny_vae(seed=4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, wan, vae):
    """Tiny base models on disk: the VLM, and the Wan DiT and VAE in the diffusers and release layouts."""
    root = tmp_path_factory.mktemp("sources")
    processor = build_tiny_processor()
    vlm = build_tiny_vlm(processor.tokenizer, seed=2)
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")

    wan.save_pretrained(root / "wan_diffusers" / "transformer")
    vae.save_pretrained(root / "wan_diffusers" / "vae")

    release = root / "wan_release"
    release.mkdir()
    (release / "config.json").write_text(json.dumps(TINY_WAN_RELEASE_CONFIG))
    release_dit = to_release_names(wan.state_dict(), RELEASE_DIT_NAMES)
    save_torch_state_dict(release_dit, release, max_shard_size="20KB")
    torch.save(to_release_names(vae.state_dict(), RELEASE_VAE_NAMES), release / "Wan2.2_VAE.pth")
    (root / "vae_config.json").write_text(json.dumps(dict(vae.config)))
    return {"root": root, "vlm_model": vlm, "release_dit": release_dit}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A LightBagel pipeline folder, the base of checkpoint conversions."""
    folder = tmp_path_factory.mktemp("base") / "lightbagel"
    LightBagelPipeline(**build_tiny_components(seed=0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_state_dict():
    """A transformer state dict with every weight different from the base folder's, fusion outputs non-zero."""
    return build_tiny_transformer(seed=7, fusion_init_std=0.05).state_dict()


def dit_outputs(transformer: LightBagelTransformer2DModel, wan: WanTransformer3DModel):
    """Run both DiTs on the same latents and the same projected text embeddings."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 1, 4, 4, generator=generator)
    timestep = torch.tensor([700.0])
    text_embeds = torch.randn(1, 5, 24, generator=generator)
    blocks = len(transformer.fusion_blocks)
    context = LightBagelContext(
        encoder_hidden_states=torch.randn(1, 5, 32, generator=generator),
        attention_mask=torch.ones(1, 5, dtype=torch.bool),
        keys=tuple(torch.randn(1, 5, 2, 12, generator=generator) for _ in range(blocks)),
        values=tuple(torch.randn(1, 5, 2, 12, generator=generator) for _ in range(blocks)),
        text_embeds=text_embeds,
    )
    wan = copy.deepcopy(wan)
    # Feed Wan the already projected embeddings, as `text_embeds` does for LightBagel.
    wan.condition_embedder.text_embedder = torch.nn.Identity()
    with torch.no_grad():
        converted = transformer(latents, timestep, context).sample
        reference = wan(latents, timestep, encoder_hidden_states=text_embeds).sample
    return converted, reference


# ---------------------------------------------------------------------------------------------------- base models
def test_base_from_diffusers_folders(sources, wan, vae, tmp_path):
    root = sources["root"]
    report = convert_base_models(root / "vlm", root / "wan_diffusers", tmp_path / "out")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")

    assert isinstance(pipe, LightBagelPipeline)
    assert pipe.scheduler.config.shift == 3.0
    converted, reference = dit_outputs(pipe.transformer, wan)
    torch.testing.assert_close(converted, reference, rtol=1e-5, atol=1e-5)
    assert_state_dicts_equal(pipe.vae.state_dict(), vae.state_dict())
    assert_state_dicts_equal(pipe.vlm.state_dict(), sources["vlm_model"].state_dict())
    assert report.keys["transformer"].key_map == "wan-diffusers-transformer"
    assert report.keys["transformer"].loaded == len(wan.state_dict()) - 2


def test_base_reinitialises_text_projection(sources, wan, tmp_path):
    root = sources["root"]
    report = convert_base_models(root / "vlm", root / "wan_diffusers", tmp_path / "out")
    transformer = LightBagelTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer")
    text_embedder = transformer.condition_embedder.text_embedder

    assert text_embedder.linear_1.weight.shape == (24, 32)
    assert torch.equal(text_embedder.linear_2.weight, wan.condition_embedder.text_embedder.linear_2.weight)
    assert set(report.keys["transformer"].reinitialised) >= {
        "condition_embedder.text_embedder.linear_1.weight",
        "condition_embedder.text_embedder.linear_1.bias",
    }
    assert "condition_embedder.text_embedder.linear_1.weight" in report.keys["transformer"].dropped
    assert "re-initialised condition_embedder.text_embedder.linear_1.weight" in report.format()


def test_base_fusion_blocks_start_at_zero(sources, tmp_path):
    root = sources["root"]
    convert_base_models(root / "vlm", root / "wan_diffusers", tmp_path / "out")
    transformer = LightBagelTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer")

    for block in transformer.fusion_blocks:
        for stream in (block.understanding, block.generation):
            assert torch.count_nonzero(stream.to_out.weight) == 0
            assert torch.count_nonzero(stream.to_out.bias) == 0
    assert transformer.config.text_dim == 32
    assert transformer.config.vlm_num_layers == 3


def test_base_from_release_layout_command(sources, wan, vae, tmp_path, capsys):
    root = sources["root"]
    argv = ["base", "--vlm", str(root / "vlm"), "--wan", str(root / "wan_release")]
    argv += ["--vae-config", str(root / "vae_config.json"), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")

    converted, reference = dit_outputs(pipe.transformer, wan)
    torch.testing.assert_close(converted, reference, rtol=1e-5, atol=1e-5)
    assert_state_dicts_equal(pipe.vae.state_dict(), vae.state_dict())
    vae_parameters = sum(parameter.numel() for parameter in vae.parameters())
    assert f"vae: AutoencoderKLWan, {vae_parameters:,} parameters, float32" in printed
    assert "wan-original-transformer" in printed
    assert "dropped text_embedding.0.weight" in printed


def test_base_release_file_needs_config(sources, tmp_path):
    root = sources["root"]
    single = tmp_path / "wan.safetensors"
    save_file(sources["release_dit"], single)
    with pytest.raises(ConversionError, match="--wan-config"):
        convert_base_models(root / "vlm", single, tmp_path / "out", wan_vae=root / "wan_diffusers" / "vae")
    assert not (tmp_path / "out").exists()


def test_base_release_single_pth_file(sources, wan, tmp_path):
    root = sources["root"]
    single = tmp_path / "wan.pth"
    torch.save(sources["release_dit"], single)
    (tmp_path / "release_config.json").write_text(json.dumps(TINY_WAN_RELEASE_CONFIG))
    convert_base_models(
        root / "vlm",
        single,
        tmp_path / "out",
        wan_vae=root / "wan_diffusers" / "vae",
        wan_config=tmp_path / "release_config.json",
        dtype=torch.bfloat16,
    )
    transformer = LightBagelTransformer2DModel.from_pretrained(
        tmp_path / "out", subfolder="transformer", dtype=torch.bfloat16
    )
    stored = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")

    assert stored["blocks.1.attn2.to_k.weight"].dtype == torch.bfloat16
    # diffusers keeps `_keep_in_fp32_modules` in float32, and so does the conversion.
    assert stored["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
    expected = wan.blocks[1].attn2.to_k.weight.to(torch.bfloat16)
    assert torch.equal(transformer.blocks[1].attn2.to_k.weight, expected)


def test_base_unknown_source_key_fails(sources, tmp_path):
    root = sources["root"]
    state_dict = dict(sources["release_dit"])
    state_dict["img_emb.proj.1.weight"] = torch.zeros(24, 24)
    single = tmp_path / "wan.safetensors"
    save_file(state_dict, single)
    (tmp_path / "config.json").write_text(json.dumps(TINY_WAN_RELEASE_CONFIG))
    with pytest.raises(ConversionError, match=r"match no target parameter.*img_emb\.proj\.1\.weight"):
        convert_base_models(root / "vlm", single, tmp_path / "out", wan_vae=root / "wan_diffusers" / "vae")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_base_wrong_shape_fails(sources, tmp_path):
    root = sources["root"]
    state_dict = dict(sources["release_dit"])
    state_dict["blocks.0.ffn.0.weight"] = torch.zeros(40, 24)
    single = tmp_path / "wan.safetensors"
    save_file(state_dict, single)
    (tmp_path / "config.json").write_text(json.dumps(TINY_WAN_RELEASE_CONFIG))
    with pytest.raises(ConversionError, match=r"wrong shape: blocks\.0\.ffn\.net\.0\.proj\.weight"):
        convert_base_models(root / "vlm", single, tmp_path / "out", wan_vae=root / "wan_diffusers" / "vae")
    assert not (tmp_path / "out").exists()


def test_base_release_vae_needs_config(sources, tmp_path):
    root = sources["root"]
    with pytest.raises(ConversionError, match="--vae-config"):
        convert_base_models(root / "vlm", root / "wan_release", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- checkpoints
def write_single_safetensors(folder: Path, state_dict) -> Path:
    save_file(state_dict, folder / "transformer.safetensors")
    return folder / "transformer.safetensors"


def write_nested_pt(folder: Path, state_dict) -> Path:
    wrapped = {f"module.{key}": value for key, value in state_dict.items()}
    torch.save({"state_dict": wrapped, "step": 100, "lr": 1e-4}, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def write_bin(folder: Path, state_dict) -> Path:
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def write_sharded(folder: Path, state_dict) -> Path:
    (folder / "sharded").mkdir()
    save_torch_state_dict(state_dict, folder / "sharded", max_shard_size="50KB")
    return folder / "sharded"


def write_accelerate_folder(folder: Path, state_dict) -> Path:
    state_folder = folder / "checkpoint-500"
    state_folder.mkdir()
    save_file({f"_orig_mod.{key}": value for key, value in state_dict.items()}, state_folder / "model.safetensors")
    torch.save({"step": 500}, state_folder / "random_states_0.pkl")
    return state_folder


@pytest.mark.parametrize(
    "write", [write_single_safetensors, write_nested_pt, write_bin, write_sharded, write_accelerate_folder]
)
def test_checkpoint_layouts_round_trip(write, base_folder, trained_state_dict, tmp_path):
    source = write(tmp_path, trained_state_dict)
    report = convert_training_checkpoint(base_folder, source, tmp_path / "out")
    transformer = LightBagelTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer")

    assert_state_dicts_equal(transformer.state_dict(), trained_state_dict)
    assert report.keys["transformer"].key_map == "lightbagel-full"
    assert report.keys["transformer"].loaded == len(trained_state_dict)


def test_checkpoint_loads_as_pipeline(base_folder, trained_state_dict, tmp_path):
    source = write_single_safetensors(tmp_path, trained_state_dict)
    convert_training_checkpoint(base_folder, source, tmp_path / "out")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    base = DiffusionPipeline.from_pretrained(base_folder)

    assert isinstance(pipe, LightBagelPipeline)
    assert_state_dicts_equal(pipe.transformer.state_dict(), trained_state_dict)
    assert_state_dicts_equal(pipe.vae.state_dict(), base.vae.state_dict())
    assert_state_dicts_equal(pipe.vlm.state_dict(), base.vlm.state_dict())


def test_checkpoint_fusion_only_fills_from_base(base_folder, trained_state_dict, tmp_path):
    fusion = {key: value for key, value in trained_state_dict.items() if key.startswith("fusion_blocks.")}
    source = write_single_safetensors(tmp_path, fusion)
    report = convert_training_checkpoint(base_folder, source, tmp_path / "out")
    transformer = LightBagelTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer")
    base = LightBagelTransformer2DModel.from_pretrained(base_folder, subfolder="transformer")

    expected = base.state_dict()
    expected.update(fusion)
    assert_state_dicts_equal(transformer.state_dict(), expected)
    assert report.keys["transformer"].key_map == "lightbagel-fusion-only"
    assert len(report.keys["transformer"].from_base) == len(expected) - len(fusion)


def test_checkpoint_ema_selected(base_folder, trained_state_dict, tmp_path):
    ema = build_tiny_transformer(seed=9, fusion_init_std=0.05).state_dict()
    combined = dict(trained_state_dict)
    combined.update({f"ema.{key}": value for key, value in ema.items()})
    source = write_single_safetensors(tmp_path, combined)

    convert_training_checkpoint(base_folder, source, tmp_path / "ema", use_ema=True)
    report = convert_training_checkpoint(base_folder, source, tmp_path / "raw")
    with_ema = LightBagelTransformer2DModel.from_pretrained(tmp_path / "ema", subfolder="transformer")
    without_ema = LightBagelTransformer2DModel.from_pretrained(tmp_path / "raw", subfolder="transformer")

    assert_state_dicts_equal(with_ema.state_dict(), ema)
    assert_state_dicts_equal(without_ema.state_dict(), trained_state_dict)
    assert "pass --ema" in report.keys["transformer"].dropped["ema.proj_out.weight"]


def test_checkpoint_ema_missing_fails(base_folder, trained_state_dict, tmp_path):
    source = write_single_safetensors(tmp_path, trained_state_dict)
    with pytest.raises(ConversionError, match="--ema was given but .* has no EMA weights"):
        convert_training_checkpoint(base_folder, source, tmp_path / "out", use_ema=True)
    assert not (tmp_path / "out").exists()


def test_checkpoint_dtype_and_variant(base_folder, trained_state_dict, tmp_path):
    source = write_single_safetensors(tmp_path, trained_state_dict)
    argv = ["checkpoint", "--base", str(base_folder), "--checkpoint", str(source), "--output", str(tmp_path / "out")]
    assert main(argv + ["--dtype", "bfloat16", "--variant", "bf16"]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", variant="bf16", dtype=torch.bfloat16)

    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    keep_in_fp32 = LightBagelTransformer2DModel._keep_in_fp32_modules
    expected = {
        key: value if any(name in key.split(".") for name in keep_in_fp32) else value.to(torch.bfloat16)
        for key, value in trained_state_dict.items()
    }
    assert_state_dicts_equal(pipe.transformer.state_dict(), expected)


def test_checkpoint_configured_prefix(base_folder, trained_state_dict, tmp_path):
    source = write_single_safetensors(tmp_path, {f"model.{key}": value for key, value in trained_state_dict.items()})
    with pytest.raises(ConversionError, match=r"wrapped in the prefix 'model\.': pass --strip-prefix model\."):
        convert_training_checkpoint(base_folder, source, tmp_path / "out")
    convert_training_checkpoint(base_folder, source, tmp_path / "out", strip_prefixes=["model."])
    transformer = LightBagelTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer")

    assert_state_dicts_equal(transformer.state_dict(), trained_state_dict)


def test_checkpoint_missing_key_fails(base_folder, trained_state_dict, tmp_path):
    partial = {key: value for key, value in trained_state_dict.items() if key != "blocks.1.attn1.to_q.weight"}
    source = write_single_safetensors(tmp_path, partial)
    expected = r"1 target parameters have no source tensor: blocks\.1\.attn1\.to_q\.weight"
    with pytest.raises(ConversionError, match=expected):
        convert_training_checkpoint(base_folder, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_checkpoint_wrong_shape_fails(base_folder, trained_state_dict, tmp_path):
    damaged = dict(trained_state_dict)
    damaged["proj_out.weight"] = torch.zeros(3, 24)
    source = write_single_safetensors(tmp_path, damaged)
    with pytest.raises(ConversionError, match=r"proj_out\.weight .*\(3, 24\), expected \(64, 24\)"):
        convert_training_checkpoint(base_folder, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("write", [write_single_safetensors, write_bin])
def test_checkpoint_truncated_file_fails(write, base_folder, trained_state_dict, tmp_path):
    source = write(tmp_path, trained_state_dict)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert_training_checkpoint(base_folder, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_pickled_object_not_loaded(base_folder, tmp_path):
    source = tmp_path / "checkpoint.pt"
    torch.save({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, source)
    with pytest.raises(ConversionError, match=r"weights_only=True"):
        convert_training_checkpoint(base_folder, source, tmp_path / "out")


def test_checkpoint_deepspeed_needs_deepspeed(base_folder, tmp_path):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here; this test covers the error when it is missing.")
    folder = tmp_path / "zero"
    (folder / "global_step10").mkdir(parents=True)
    (folder / "latest").write_text("global_step10")
    with pytest.raises(ConversionError, match="pip install deepspeed"):
        convert_training_checkpoint(base_folder, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_existing_output_needs_overwrite(base_folder, trained_state_dict, tmp_path):
    source = write_single_safetensors(tmp_path, trained_state_dict)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        convert_training_checkpoint(base_folder, source, output)
    assert (output / "keep.txt").read_text() == "user data"

    convert_training_checkpoint(base_folder, source, output, overwrite=True)
    assert not (output / "keep.txt").exists()
    assert (output / "model_index.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_output_modes_follow_umask(base_folder, trained_state_dict, tmp_path, umask):
    source = write_single_safetensors(tmp_path, trained_state_dict)
    output = tmp_path / "out"
    previous = os.umask(umask)
    try:
        convert_training_checkpoint(base_folder, source, output)
    finally:
        os.umask(previous)

    assert output.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("model_index.json", "README.md", "pipeline_lightbagel.py", "transformer/config.json"):
        assert (output / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert leftovers(tmp_path) == []


def test_command_reports_error_and_status(base_folder, tmp_path, capsys):
    argv = ["checkpoint", "--base", str(base_folder), "--checkpoint", str(tmp_path / "absent.pt")]
    assert main(argv + ["--output", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
