import json
import logging
import os
import re

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model_state_dict

from diffusers_lightbagel import LightBagelPipeline
from diffusers_lightbagel.loaders import (
    DEFAULT_LORA_TARGET_MODULES,
    convert_lora_state_dict,
    default_lora_target_modules,
)
from diffusers_lightbagel.tiny import build_tiny_components


RANK = 4
CALL = dict(height=64, width=64, num_inference_steps=2, output_type="latent", guidance_scale=1.0)


def run(pipe, prompt="a red cube"):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images


def linear_layers(transformer, pattern=None):
    pattern = pattern or "|".join(DEFAULT_LORA_TARGET_MODULES)
    layers = {}
    for name, module in transformer.named_modules():
        # After a LoRA is loaded, PEFT wraps each targeted nn.Linear as `base_layer`.
        linear = getattr(module, "base_layer", module)
        if isinstance(linear, nn.Linear) and re.fullmatch(pattern, name):
            layers[name] = linear
    return layers


def random_lora(transformer, seed, pattern=None, std=0.2):
    """A diffusers-format LoRA state dict with non-zero factors on the matching linear layers."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, linear in linear_layers(transformer, pattern).items():
        state_dict[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=generator) * std
        state_dict[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=generator) * std
    return state_dict


def save_lora(folder, state_dict, weight_name="pytorch_lora_weights.safetensors"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, weight_name)
    safetensors.torch.save_file(state_dict, path)
    return path


def test_lora_changes_output(tiny_pipe):
    base = run(tiny_pipe)
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=1), adapter_name="style")
    assert tiny_pipe.get_active_adapters() == ["style"]
    assert (run(tiny_pipe) - base).abs().max() > 1e-3


def test_lora_on_understanding_changes_context(tiny_pipe):
    before, _ = tiny_pipe.encode_prompt("a red cube", do_classifier_free_guidance=False)
    lora = random_lora(tiny_pipe.transformer, seed=1, pattern=r"fusion_blocks\.\d+\.understanding\.to_(q|k|v|out)")
    tiny_pipe.load_lora_weights(lora)
    after, _ = tiny_pipe.encode_prompt("a red cube", do_classifier_free_guidance=False)
    assert (after.encoder_hidden_states - before.encoder_hidden_states).abs().max() > 1e-3
    assert (after.keys[-1] - before.keys[-1]).abs().max() > 1e-3


def test_unload_restores_output_exactly(tiny_pipe):
    base = run(tiny_pipe)
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=1))
    tiny_pipe.unload_lora_weights()
    assert torch.equal(run(tiny_pipe), base)


def test_disable_and_enable_lora(tiny_pipe):
    base = run(tiny_pipe)
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=1))
    with_lora = run(tiny_pipe)
    tiny_pipe.disable_lora()
    assert torch.equal(run(tiny_pipe), base)
    tiny_pipe.enable_lora()
    assert torch.equal(run(tiny_pipe), with_lora)


def test_fused_output_matches_unfused(tiny_pipe):
    base = run(tiny_pipe)
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=1))
    unfused = run(tiny_pipe)
    tiny_pipe.fuse_lora(lora_scale=1.0)
    assert tiny_pipe.num_fused_loras == 1
    torch.testing.assert_close(run(tiny_pipe), unfused, atol=1e-4, rtol=1e-4)
    tiny_pipe.unfuse_lora()
    tiny_pipe.unload_lora_weights()
    torch.testing.assert_close(run(tiny_pipe), base, atol=1e-4, rtol=1e-4)


def test_fuse_lora_scale_matches_adapter_weight(tiny_pipe):
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=1), adapter_name="a")
    tiny_pipe.set_adapters("a", adapter_weights=0.5)
    half = run(tiny_pipe)
    tiny_pipe.set_adapters("a", adapter_weights=1.0)
    tiny_pipe.fuse_lora(lora_scale=0.5)
    torch.testing.assert_close(run(tiny_pipe), half, atol=1e-4, rtol=1e-4)


def test_adapters_blend_by_weights(tiny_pipe):
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=1), adapter_name="a")
    tiny_pipe.load_lora_weights(random_lora(tiny_pipe.transformer, seed=2), adapter_name="b")
    tiny_pipe.set_adapters("a")
    only_a = run(tiny_pipe)
    tiny_pipe.set_adapters("b")
    only_b = run(tiny_pipe)
    assert (only_a - only_b).abs().max() > 1e-3

    tiny_pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.0])
    torch.testing.assert_close(run(tiny_pipe), only_a, atol=1e-5, rtol=1e-5)
    tiny_pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 1.0])
    torch.testing.assert_close(run(tiny_pipe), only_b, atol=1e-5, rtol=1e-5)
    tiny_pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    blend = run(tiny_pipe)
    assert (blend - only_a).abs().max() > 1e-3
    assert (blend - only_b).abs().max() > 1e-3
    assert sorted(tiny_pipe.get_active_adapters()) == ["a", "b"]


def test_saved_lora_loads_into_fresh_pipeline(tiny_pipe, tmp_path):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    tiny_pipe.load_lora_weights(lora)
    expected = run(tiny_pipe)
    layers = {key.removeprefix("transformer."): value for key, value in lora.items()}
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=sorted({key.rsplit(".lora_", 1)[0] for key in layers}))
    LightBagelPipeline.save_lora_weights(tmp_path, layers, transformer_lora_adapter_metadata=config.to_dict())

    fresh = LightBagelPipeline(**build_tiny_components(seed=0, fusion_init_std=0.05))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path, adapter_name="saved")
    torch.testing.assert_close(run(fresh), expected, atol=1e-5, rtol=1e-5)


def add_scaled_adapter(pipe, adapter_name, rank, alpha):
    """Add a trainable-style adapter with non-zero lora_B, so the adapter changes the output."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=default_lora_target_modules()
    )
    pipe.transformer.add_adapter(config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if f"lora_B.{adapter_name}" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def fresh_pipeline():
    pipe = LightBagelPipeline(**build_tiny_components(seed=0, fusion_init_std=0.05))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_alpha_round_trips_exactly(tiny_pipe, tmp_path, caplog):
    base = run(tiny_pipe)
    add_scaled_adapter(tiny_pipe, "style", rank=4, alpha=16)
    in_memory = run(tiny_pipe)
    assert (in_memory - base).abs().max() > 1e-3
    tiny_pipe.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(tiny_pipe.transformer, adapter_name="style"),
        transformer_lora_adapter_metadata=tiny_pipe.transformer.peft_config["style"].to_dict(),
    )

    fresh = fresh_pipeline()
    with caplog.at_level(logging.WARNING, logger="diffusers_lightbagel"):
        fresh.load_lora_weights(tmp_path, adapter_name="style")
    assert "metadata" not in caplog.text
    config = fresh.transformer.peft_config["style"]
    assert config.r == 4
    assert config.lora_alpha == 16
    assert config.target_modules == default_lora_target_modules()
    assert fresh.transformer.blocks[0].attn1.to_q.scaling["style"] == 4.0
    assert fresh.transformer.fusion_blocks[0].understanding.to_q.scaling["style"] == 4.0
    torch.testing.assert_close(run(fresh), in_memory, atol=1e-6, rtol=0)


def test_saved_metadata_uses_component_prefix(tiny_pipe, tmp_path):
    add_scaled_adapter(tiny_pipe, "style", rank=4, alpha=16)
    tiny_pipe.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(tiny_pipe.transformer, adapter_name="style"),
        transformer_lora_adapter_metadata=tiny_pipe.transformer.peft_config["style"].to_dict(),
    )
    with safetensors.safe_open(tmp_path / "pytorch_lora_weights.safetensors", framework="pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4
    assert metadata["transformer.lora_alpha"] == 16
    assert "lora_alpha" not in metadata


def test_unprefixed_metadata_keeps_alpha(tiny_pipe, tmp_path):
    # ModelMixin.save_lora_adapter writes keys and metadata without the "transformer." prefix.
    add_scaled_adapter(tiny_pipe, "style", rank=4, alpha=16)
    in_memory = run(tiny_pipe)
    tiny_pipe.transformer.save_lora_adapter(tmp_path, adapter_name="style")

    fresh = fresh_pipeline()
    fresh.load_lora_weights(tmp_path, adapter_name="style")
    assert fresh.transformer.peft_config["style"].lora_alpha == 16
    assert fresh.transformer.blocks[0].attn1.to_q.scaling["style"] == 4.0
    torch.testing.assert_close(run(fresh), in_memory, atol=1e-6, rtol=0)


def test_metadata_without_targets_warns(tiny_pipe, tmp_path, caplog):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 16})}
    safetensors.torch.save_file(lora, tmp_path / "pytorch_lora_weights.safetensors", metadata=metadata)
    with caplog.at_level(logging.WARNING, logger="diffusers_lightbagel"):
        tiny_pipe.load_lora_weights(tmp_path, adapter_name="partial")
    assert "has no transformer.target_modules" in caplog.text
    assert tiny_pipe.transformer.peft_config["partial"].lora_alpha == RANK


def test_save_rejects_incomplete_metadata(tiny_pipe, tmp_path):
    layers = {key.removeprefix("transformer."): v for key, v in random_lora(tiny_pipe.transformer, seed=1).items()}
    with pytest.raises(ValueError, match=r"is missing the fields \['target_modules'\]"):
        LightBagelPipeline.save_lora_weights(
            tmp_path, layers, transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 16}
        )
    config = LoraConfig(r=RANK, lora_alpha=16, target_modules=default_lora_target_modules()).to_dict()
    with pytest.raises(ValueError, match="safe_serialization=True"):
        LightBagelPipeline.save_lora_weights(
            tmp_path, layers, transformer_lora_adapter_metadata=config, safe_serialization=False
        )
    assert os.listdir(tmp_path) == []


def test_save_refuses_existing_file(tiny_pipe, tmp_path):
    layers = {key.removeprefix("transformer."): v for key, v in random_lora(tiny_pipe.transformer, seed=1).items()}
    LightBagelPipeline.save_lora_weights(tmp_path, layers)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        LightBagelPipeline.save_lora_weights(tmp_path, layers)
    LightBagelPipeline.save_lora_weights(tmp_path, layers, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["pytorch_lora_weights.safetensors"]


def test_load_from_file_path_and_weight_name(tiny_pipe, tmp_path):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    path = save_lora(tmp_path, lora, weight_name="style.safetensors")
    save_lora(tmp_path, random_lora(tiny_pipe.transformer, seed=2), weight_name="other.safetensors")
    tiny_pipe.load_lora_weights(path, adapter_name="by_path")
    by_path = run(tiny_pipe)
    tiny_pipe.unload_lora_weights()
    tiny_pipe.load_lora_weights(tmp_path, weight_name="style.safetensors", adapter_name="by_name")
    torch.testing.assert_close(run(tiny_pipe), by_path)


def test_load_from_hub_cache_offline(tiny_pipe, tmp_path):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    snapshot = tmp_path / "models--someone--lightbagel-lora" / "snapshots" / ("0" * 40)
    save_lora(snapshot, lora)
    (tmp_path / "models--someone--lightbagel-lora" / "refs").mkdir()
    (tmp_path / "models--someone--lightbagel-lora" / "refs" / "main").write_text("0" * 40)

    tiny_pipe.load_lora_weights("someone/lightbagel-lora", cache_dir=str(tmp_path), local_files_only=True)
    from_cache = run(tiny_pipe)
    tiny_pipe.unload_lora_weights()
    tiny_pipe.load_lora_weights(lora)
    torch.testing.assert_close(run(tiny_pipe), from_cache)


def scaled_reference(down, up, alpha):
    return down * (alpha / down.shape[0]), up


def test_wan_format_matches_diffusers_format(tiny_pipe):
    generator = torch.Generator().manual_seed(3)
    q_down, q_up = torch.randn(RANK, 24, generator=generator), torch.randn(24, RANK, generator=generator)
    v_down, v_up = torch.randn(RANK, 24, generator=generator), torch.randn(24, RANK, generator=generator)
    wan = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": q_down,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0),
        "diffusion_model.blocks.1.cross_attn.v.lora_down.weight": v_down,
        "diffusion_model.blocks.1.cross_attn.v.lora_up.weight": v_up,
    }
    converted = convert_lora_state_dict(wan)
    assert sorted(converted) == [
        "transformer.blocks.0.attn1.to_q.lora_A.weight",
        "transformer.blocks.0.attn1.to_q.lora_B.weight",
        "transformer.blocks.1.attn2.to_v.lora_A.weight",
        "transformer.blocks.1.attn2.to_v.lora_B.weight",
    ]
    tiny_pipe.load_lora_weights(wan, adapter_name="wan")
    from_wan = run(tiny_pipe)
    tiny_pipe.unload_lora_weights()

    # alpha 2 at rank 4 halves the product up @ down. The cross-attention pair has no alpha, so its scale is 1.
    q_a, q_b = scaled_reference(q_down, q_up, 2.0)
    tiny_pipe.load_lora_weights(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": q_a,
            "transformer.blocks.0.attn1.to_q.lora_B.weight": q_b,
            "transformer.blocks.1.attn2.to_v.lora_A.weight": v_down,
            "transformer.blocks.1.attn2.to_v.lora_B.weight": v_up,
        },
        adapter_name="diffusers",
    )
    torch.testing.assert_close(run(tiny_pipe), from_wan, atol=1e-5, rtol=1e-5)


def test_kohya_format_matches_diffusers_format(tiny_pipe):
    generator = torch.Generator().manual_seed(4)
    q_down, q_up = torch.randn(RANK, 24, generator=generator), torch.randn(24, RANK, generator=generator)
    fusion_down, fusion_up = torch.randn(RANK, 24, generator=generator), torch.randn(24, RANK, generator=generator)
    kohya = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": q_down,
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": q_up,
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(8.0),
        "lora_unet_fusion_blocks_1_generation_to_out.lora_down.weight": fusion_down,
        "lora_unet_fusion_blocks_1_generation_to_out.lora_up.weight": fusion_up,
    }
    tiny_pipe.load_lora_weights(kohya, adapter_name="kohya")
    from_kohya = run(tiny_pipe)
    tiny_pipe.unload_lora_weights()

    q_a, q_b = scaled_reference(q_down, q_up, 8.0)
    tiny_pipe.load_lora_weights(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": q_a,
            "transformer.blocks.0.attn1.to_q.lora_B.weight": q_b,
            "transformer.fusion_blocks.1.generation.to_out.lora_A.weight": fusion_down,
            "transformer.fusion_blocks.1.generation.to_out.lora_B.weight": fusion_up,
        },
        adapter_name="diffusers",
    )
    torch.testing.assert_close(run(tiny_pipe), from_kohya, atol=1e-5, rtol=1e-5)


def test_wrong_shapes_error_names_keys(tiny_pipe):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    lora["transformer.blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 7)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_q\.lora_A\.weight: shape \(4, 7\), expected \(4, 24\)"):
        tiny_pipe.load_lora_weights(lora)
    assert not getattr(tiny_pipe.transformer, "peft_config", {})


def test_unknown_keys_error_names_keys(tiny_pipe):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    lora["transformer.blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 24)
    lora["vlm.model.layers.0.q_proj.lora_A.weight"] = torch.zeros(RANK, 32)
    with pytest.raises(ValueError) as error:
        tiny_pipe.load_lora_weights(lora)
    message = str(error.value)
    assert "transformer.blocks.9.attn1.to_q.lora_A.weight: the transformer has no module 'blocks.9.attn1.to_q'" in message
    assert "vlm.model.layers.0.q_proj.lora_A.weight: not a transformer weight" in message


def test_unpaired_factor_is_rejected(tiny_pipe):
    lora = random_lora(tiny_pipe.transformer, seed=1)
    del lora["transformer.blocks.1.attn2.to_k.lora_B.weight"]
    with pytest.raises(ValueError, match=r"transformer\.blocks\.1\.attn2\.to_k: lora_B\.weight is missing"):
        tiny_pipe.load_lora_weights(lora)


def test_unknown_wan_keys_error_names_keys(tiny_pipe):
    wan = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 24),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(24, RANK),
        "diffusion_model.blocks.0.norm3.diff_b": torch.zeros(24),
        "diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight": torch.zeros(RANK, 24),
    }
    with pytest.raises(ValueError) as error:
        tiny_pipe.load_lora_weights(wan)
    message = str(error.value)
    assert "diffusion_model.blocks.0.norm3.diff_b" in message
    assert "diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight" in message


def test_unpaired_kohya_keys_error_names_keys(tiny_pipe):
    kohya = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(RANK, 24),
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0),
    }
    with pytest.raises(ValueError, match="lora_unet_blocks_0_self_attn_q.lora_down.weight"):
        tiny_pipe.load_lora_weights(kohya)


def test_edit_pipeline_loads_lora(tiny_edit_pipe, rgb_image):
    call = dict(image=rgb_image, prompt="make it blue", **CALL)
    base = tiny_edit_pipe(generator=torch.Generator().manual_seed(0), **call).images
    tiny_edit_pipe.load_lora_weights(random_lora(tiny_edit_pipe.transformer, seed=1))
    edited = tiny_edit_pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert (edited - base).abs().max() > 1e-3
