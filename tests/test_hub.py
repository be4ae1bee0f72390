"""Saving, loading and sharing LightBagel pipelines: local folders, the offline Hub cache, remote code, model cards."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file

from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers_lightbagel import LightBagelEditPipeline, LightBagelPipeline, LightBagelTransformer2DModel
from diffusers_lightbagel.hub import (
    LightBagelRepositoryError,
    render_remote_code,
    validate_repository,
    write_text_atomic,
)
from diffusers_lightbagel.tiny import build_tiny_components, build_tiny_transformer
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor


REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES_FOLDER = REPO_ROOT / "pipelines"


def _state_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    first_state, second_state = first.state_dict(), second.state_dict()
    if first_state.keys() != second_state.keys():
        return False
    return all(torch.equal(first_state[name].float(), second_state[name].float()) for name in first_state)


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def saved_repository(tmp_path_factory):
    """A tiny LightBagelPipeline saved once per module; tests copy it before changing it."""
    pipe = LightBagelPipeline(**build_tiny_components(seed=0, fusion_init_std=0.05))
    folder = tmp_path_factory.mktemp("saved") / "lightbagel-tiny"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture
def repository_copy(saved_repository, tmp_path):
    _, folder = saved_repository
    copy = tmp_path / "repository"
    shutil.copytree(folder, copy)
    return copy


def _lay_out_hub_cache(source: Path, cache_dir: Path, repo_id: str) -> Path:
    """Store `source` in `cache_dir` the way huggingface_hub does: blobs by hash, refs/main, snapshot symlinks."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}"
    blobs = storage / "blobs"
    snapshot = storage / "snapshots" / commit
    blobs.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for relative in sorted(_files(source)):
        data = (source / relative).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


# ---------------------------------------------------------------------------------------------------- saving
def test_save_writes_hub_files(saved_repository):
    _, folder = saved_repository
    files = _files(folder)

    assert {"README.md", "model_index.json", "pipeline_lightbagel.py"} <= files
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert "vlm/model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not [name for name in folder.parent.iterdir() if ".staging-" in name.name]


def test_save_records_stable_library_names(saved_repository):
    _, folder = saved_repository
    model_index = json.loads((folder / "model_index.json").read_text())

    assert model_index["_class_name"] == "LightBagelPipeline"
    assert model_index["transformer"] == ["diffusers", "LightBagelTransformer2DModel"]
    assert model_index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert model_index["vlm"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert model_index["_diffusers_lightbagel_version"] == "0.1.0"


def test_remote_code_exports_saved_class(saved_repository):
    _, folder = saved_repository
    text = (folder / "pipeline_lightbagel.py").read_text()

    assert text == render_remote_code("LightBagelPipeline")
    # diffusers re-executes the file into the module object an earlier repository's file left behind.
    namespace = {"LightBagelEditPipeline": LightBagelEditPipeline}
    exec(compile(text, "pipeline_lightbagel.py", "exec"), namespace)
    pipeline_classes = [
        value for value in namespace.values() if isinstance(value, type) and issubclass(value, DiffusionPipeline)
    ]
    assert pipeline_classes == [LightBagelPipeline]


def test_resave_same_pipeline_is_accepted(saved_repository, repository_copy):
    pipe, _ = saved_repository
    before = {name: (repository_copy / name).read_bytes() for name in _files(repository_copy)}

    pipe.save_pretrained(repository_copy)

    after = {name: (repository_copy / name).read_bytes() for name in _files(repository_copy)}
    assert after == before


def test_save_keeps_different_files_without_overwrite(saved_repository, repository_copy):
    pipe, _ = saved_repository
    other = LightBagelPipeline(**{**pipe.components, "transformer": build_tiny_transformer(seed=7)})
    weights = repository_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()

    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save_pretrained(repository_copy)

    assert weights.read_bytes() == original
    assert not [name for name in repository_copy.parent.iterdir() if ".staging-" in name.name]


def test_save_overwrite_replaces_and_drops_stale_shards(saved_repository, repository_copy):
    pipe, _ = saved_repository
    pipe.save_pretrained(repository_copy, max_shard_size="50KB", overwrite=True)
    sharded = _files(repository_copy)
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in sharded
    assert "transformer/diffusion_pytorch_model.safetensors" not in sharded

    pipe.save_pretrained(repository_copy, overwrite=True)

    unsharded = _files(repository_copy)
    assert "transformer/diffusion_pytorch_model.safetensors" in unsharded
    assert not [name for name in unsharded if "-of-" in name or name.endswith(".index.json")]


def test_save_keeps_user_model_card(saved_repository, repository_copy):
    pipe, _ = saved_repository
    card = repository_copy / "README.md"
    card.write_text("my own card\n")

    pipe.save_pretrained(repository_copy)
    assert card.read_text() == "my own card\n"

    pipe.save_pretrained(repository_copy, overwrite=True)
    assert card.read_text().startswith("---\n")


def test_save_rejects_invalid_variant(saved_repository, tmp_path):
    pipe, _ = saved_repository
    with pytest.raises(ValueError, match="variant"):
        pipe.save_pretrained(tmp_path / "out", variant="fp16/../x")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def known_umask(request):
    """Set the process umask to the parametrized value for one test and restore it afterwards."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("known_umask", [0o022, 0o027], indirect=True)
def test_save_modes_follow_umask(saved_repository, tmp_path, known_umask):
    pipe, _ = saved_repository
    folder = tmp_path / "shared"
    pipe.save_pretrained(folder)

    assert _mode(folder) == 0o777 & ~known_umask
    assert _mode(folder / "transformer") == 0o777 & ~known_umask
    for name in ("model_index.json", "README.md", "pipeline_lightbagel.py", "transformer/config.json"):
        assert _mode(folder / name) == 0o666 & ~known_umask, name


@pytest.mark.parametrize("known_umask", [0o022], indirect=True)
def test_write_text_atomic_keeps_existing_mode(tmp_path, known_umask):
    existing = tmp_path / "private.json"
    existing.write_text("{}")
    existing.chmod(0o600)

    write_text_atomic(existing, '{"a": 1}')
    write_text_atomic(tmp_path / "new.json", "{}")

    assert existing.read_text() == '{"a": 1}'
    assert _mode(existing) == 0o600
    assert _mode(tmp_path / "new.json") == 0o644


def test_resave_after_load_is_accepted(repository_copy):
    before = {name: (repository_copy / name).read_bytes() for name in _files(repository_copy)}
    loaded = LightBagelPipeline.from_pretrained(repository_copy)

    loaded.save_pretrained(repository_copy)

    after = {name: (repository_copy / name).read_bytes() for name in _files(repository_copy)}
    assert after == before
    assert not [name for name in repository_copy.parent.iterdir() if ".staging-" in name.name]


def test_save_rejects_changed_config_field(saved_repository, repository_copy):
    pipe, _ = saved_repository
    config_path = repository_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["shift"] = config["shift"] + 1.0
    config_path.write_text(json.dumps(config))

    with pytest.raises(FileExistsError, match="scheduler/scheduler_config.json"):
        pipe.save_pretrained(repository_copy)

    assert json.loads(config_path.read_text())["shift"] == config["shift"]


# ---------------------------------------------------------------------------------------------------- loading
def test_load_local_folder_returns_pipeline(saved_repository):
    pipe, folder = saved_repository
    loaded = DiffusionPipeline.from_pretrained(folder)

    assert type(loaded) is LightBagelPipeline
    assert _state_equal(loaded.transformer, pipe.transformer)
    assert _state_equal(loaded.vae, pipe.vae)
    assert _state_equal(loaded.vlm, pipe.vlm)


def test_load_edit_repository_returns_edit_pipeline(saved_repository, tmp_path):
    pipe, _ = saved_repository
    edit = LightBagelEditPipeline(**pipe.components)
    edit.save_pretrained(tmp_path / "edit")

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "edit")

    assert type(loaded) is LightBagelEditPipeline
    assert "LightBagelEditPipeline" in (tmp_path / "edit" / "pipeline_lightbagel.py").read_text()


def test_load_repo_id_from_offline_cache(saved_repository, tmp_path, monkeypatch):
    pipe, folder = saved_repository
    cache_dir = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = _lay_out_hub_cache(folder, cache_dir, "lightbagel-org/lightbagel-tiny")

    loaded = DiffusionPipeline.from_pretrained("lightbagel-org/lightbagel-tiny", cache_dir=cache_dir)
    checked = LightBagelPipeline.from_pretrained("lightbagel-org/lightbagel-tiny", cache_dir=cache_dir)

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(loaded) is LightBagelPipeline
    assert _state_equal(loaded.transformer, pipe.transformer)
    assert checked.name_or_path == "lightbagel-org/lightbagel-tiny"
    assert (snapshot / "transformer" / "config.json").is_symlink()


def test_component_loads_from_offline_cache(saved_repository, tmp_path):
    pipe, folder = saved_repository
    _lay_out_hub_cache(folder, tmp_path / "hub", "lightbagel-org/lightbagel-tiny")

    transformer = LightBagelTransformer2DModel.from_pretrained(
        "lightbagel-org/lightbagel-tiny", subfolder="transformer", cache_dir=tmp_path / "hub"
    )

    assert _state_equal(transformer, pipe.transformer)


def test_each_component_loads_from_subfolder(saved_repository):
    pipe, folder = saved_repository

    transformer = LightBagelTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae")
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, subfolder="vlm")
    processor = Qwen2_5_VLProcessor.from_pretrained(folder, subfolder="processor")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")

    assert _state_equal(transformer, pipe.transformer)
    assert _state_equal(vae, pipe.vae)
    assert _state_equal(vlm, pipe.vlm)
    assert processor.tokenizer.get_vocab() == pipe.processor.tokenizer.get_vocab()
    assert scheduler.config.shift == pipe.scheduler.config.shift == 3.0


@pytest.mark.parametrize("loader", [DiffusionPipeline, LightBagelPipeline])
def test_component_override_at_load(saved_repository, loader):
    _, folder = saved_repository
    other = build_tiny_transformer(seed=11)

    loaded = loader.from_pretrained(folder, transformer=other)

    assert loaded.transformer is other


def test_from_pipe_shares_weights(saved_repository):
    _, folder = saved_repository
    pipe = DiffusionPipeline.from_pretrained(folder)

    edit = LightBagelEditPipeline.from_pipe(pipe)

    assert type(edit) is LightBagelEditPipeline
    for name in ("transformer", "vae", "vlm"):
        original = next(getattr(pipe, name).parameters())
        shared = next(getattr(edit, name).parameters())
        assert shared.data_ptr() == original.data_ptr(), name
    assert edit.processor is pipe.processor


def test_dtype_single(saved_repository):
    _, folder = saved_repository
    loaded = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)

    assert loaded.transformer.proj_out.weight.dtype == torch.bfloat16
    assert loaded.vae.dtype == torch.bfloat16
    assert loaded.vlm.dtype == torch.bfloat16


@pytest.mark.parametrize("pipeline_class", [LightBagelPipeline, DiffusionPipeline])
def test_dtype_per_component(saved_repository, pipeline_class, recwarn):
    _, folder = saved_repository
    loaded = pipeline_class.from_pretrained(folder, dtype={"default": torch.bfloat16, "vae": torch.float32})

    assert type(loaded) is LightBagelPipeline
    assert loaded.transformer.proj_out.weight.dtype == torch.bfloat16
    assert loaded.vlm.dtype == torch.bfloat16
    assert loaded.vae.dtype == torch.float32
    # _keep_in_fp32_modules stay in float32 under a dtype dict too.
    assert loaded.transformer.scale_shift_table.dtype == torch.float32
    assert not [warning for warning in recwarn if "torch_dtype" in str(warning.message)]


@pytest.mark.parametrize("variant, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_variant_round_trip(saved_repository, tmp_path, variant, dtype):
    pipe, _ = saved_repository
    folder = tmp_path / "variant"
    cast = LightBagelPipeline(**build_tiny_components(seed=0, fusion_init_std=0.05)).to(dtype)
    cast.save_pretrained(folder, variant=variant)

    files = _files(folder)
    assert f"transformer/diffusion_pytorch_model.{variant}.safetensors" in files
    assert f"vae/diffusion_pytorch_model.{variant}.safetensors" in files
    assert "transformer/diffusion_pytorch_model.safetensors" not in files
    stored = load_file(folder / "transformer" / f"diffusion_pytorch_model.{variant}.safetensors")
    assert stored["proj_out.weight"].dtype == dtype

    loaded = LightBagelPipeline.from_pretrained(folder, variant=variant, dtype=dtype)
    assert loaded.transformer.proj_out.weight.dtype == dtype
    assert torch.equal(loaded.transformer.proj_out.weight, cast.transformer.proj_out.weight)
    assert torch.equal(loaded.transformer.proj_out.weight.float(), pipe.transformer.proj_out.weight.to(dtype).float())


def test_missing_variant_raises_diffusers_error(saved_repository):
    _, folder = saved_repository
    with pytest.raises(ValueError, match="variant=fp16"):
        DiffusionPipeline.from_pretrained(folder, variant="fp16")


@pytest.fixture(scope="module")
def bf16_repository(tmp_path_factory):
    """The tiny pipeline with its transformer and VLM in bfloat16 and the VAE in float32, saved with variant="bf16"."""
    pipe = LightBagelPipeline(**build_tiny_components(seed=0))
    pipe.transformer.to(torch.bfloat16)
    pipe.vlm.to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("variant") / "lb_bf16"
    pipe.save_pretrained(folder, variant="bf16")
    return folder


def test_load_without_variant_names_variant(bf16_repository):
    with pytest.raises(LightBagelRepositoryError, match=r"variant='bf16'") as raised:
        LightBagelPipeline.from_pretrained(bf16_repository)

    message = str(raised.value)
    assert "vlm/" in message
    assert str(bf16_repository) in message
    assert "only weights saved with a variant ('bf16')" in message
    assert raised.value.file == "vlm/"
    assert raised.value.field == "vlm"


def test_load_other_variant_names_available(bf16_repository):
    with pytest.raises(LightBagelRepositoryError, match=r"no weights for variant='fp16', only for 'bf16'"):
        validate_repository(bf16_repository, variant="fp16")


def test_validate_sharded_variant_without_variant(saved_repository, tmp_path):
    pipe, _ = saved_repository
    folder = tmp_path / "sharded"
    pipe.save_pretrained(folder, variant="fp16", max_shard_size="50KB")
    assert "transformer/diffusion_pytorch_model.safetensors.index.fp16.json" in _files(folder)

    with pytest.raises(LightBagelRepositoryError, match=r"variant='fp16'"):
        validate_repository(folder, passed_components=["vlm"])
    validate_repository(folder, variant="fp16")


def test_load_bf16_variant_keeps_float32_vae(bf16_repository):
    loaded = LightBagelPipeline.from_pretrained(
        bf16_repository, variant="bf16", dtype={"default": torch.bfloat16, "vae": torch.float32}
    )

    assert loaded.transformer.proj_out.weight.dtype == torch.bfloat16
    assert loaded.vae.dtype == torch.float32
    stored_vae = load_file(bf16_repository / "vae" / "diffusion_pytorch_model.bf16.safetensors")
    assert stored_vae["decoder.conv_out.weight"].dtype == torch.float32


def test_variant_warning_skips_float32_vae(saved_repository, tmp_path, caplog):
    pipe, _ = saved_repository
    mixed = LightBagelPipeline(**{**pipe.components, "transformer": build_tiny_transformer(seed=0).to(torch.bfloat16)})

    with caplog.at_level("WARNING", logger="diffusers_lightbagel"):
        mixed.save_pretrained(tmp_path / "mixed", variant="bf16")

    warned = [record.getMessage() for record in caplog.records if "only names the files" in record.getMessage()]
    assert len(warned) == 1
    assert "the vlm weights are torch.float32" in warned[0]


def test_sharded_save_round_trip(saved_repository, tmp_path):
    pipe, _ = saved_repository
    folder = tmp_path / "sharded"
    pipe.save_pretrained(folder, max_shard_size="50KB")

    files = _files(folder)
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all(f"transformer/{shard}" in files for shard in shards)
    assert "vlm/model.safetensors.index.json" in files

    loaded = LightBagelPipeline.from_pretrained(folder)
    assert _state_equal(loaded.transformer, pipe.transformer)
    assert _state_equal(loaded.vlm, pipe.vlm)


def test_pickle_format_only_on_request(saved_repository, tmp_path):
    pipe, _ = saved_repository
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)

    files = _files(tmp_path / "pickled")
    assert "transformer/diffusion_pytorch_model.bin" in files
    assert "transformer/diffusion_pytorch_model.safetensors" not in files


def test_device_map_balanced_on_cpu(saved_repository):
    _, folder = saved_repository
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only behaviour")

    loaded = LightBagelPipeline.from_pretrained(folder, device_map="balanced")

    assert type(loaded) is LightBagelPipeline
    assert loaded.hf_device_map is None
    assert loaded.transformer.device.type == "cpu"


def test_device_map_auto_rejected_by_diffusers(saved_repository):
    _, folder = saved_repository
    with pytest.raises(NotImplementedError, match="Supported strategies are: balanced"):
        DiffusionPipeline.from_pretrained(folder, device_map="auto")


# ---------------------------------------------------------------------------------------------------- a fresh process
REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from diffusers import DiffusionPipeline

    text_to_image, edit = sys.argv[1], sys.argv[2]
    results = {}
    try:
        DiffusionPipeline.from_pretrained(text_to_image)
    except AttributeError as error:
        results["no_import"] = str(error)
    try:
        DiffusionPipeline.from_pretrained(text_to_image, trust_remote_code=True)
    except AttributeError as error:
        results["trust_only"] = str(error)
    try:
        DiffusionPipeline.from_pretrained(text_to_image, custom_pipeline="pipeline_lightbagel")
    except ValueError as error:
        results["custom_pipeline_only"] = str(error)
    results["imported_before_remote_code"] = "diffusers_lightbagel" in sys.modules

    pipe = DiffusionPipeline.from_pretrained(
        text_to_image, custom_pipeline="pipeline_lightbagel", trust_remote_code=True
    )
    results["text_to_image"] = [type(pipe).__module__, type(pipe).__name__]
    results["transformer"] = type(pipe.transformer).__name__
    pipe = DiffusionPipeline.from_pretrained(edit, custom_pipeline="pipeline_lightbagel", trust_remote_code=True)
    results["edit"] = type(pipe).__name__
    print(json.dumps(results))
    """
)


def test_fresh_process_loads_through_remote_code(saved_repository, tmp_path):
    pipe, folder = saved_repository
    edit_folder = tmp_path / "edit"
    LightBagelEditPipeline(**pipe.components).save_pretrained(edit_folder)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}

    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder), str(edit_folder)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["no_import"] == "module diffusers has no attribute LightBagelPipeline"
    assert results["trust_only"] == "module diffusers has no attribute LightBagelPipeline"
    assert "Pass `trust_remote_code=True`" in results["custom_pipeline_only"]
    assert results["imported_before_remote_code"] is False
    assert results["text_to_image"] == ["diffusers_lightbagel.pipelines.pipeline_lightbagel", "LightBagelPipeline"]
    assert results["transformer"] == "LightBagelTransformer2DModel"
    assert results["edit"] == "LightBagelEditPipeline"


# ---------------------------------------------------------------------------------------------------- push_to_hub
@pytest.fixture
def recorded_hub_calls(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message=None, create_pr=False, **kwargs):
        folder = Path(folder_path)
        calls["upload_folder"] = {
            "repo_id": repo_id,
            "files": _files(folder),
            "card": (folder / "README.md").read_text(),
            "commit_message": commit_message,
            "create_pr": create_pr,
        }
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_expected_files(saved_repository, recorded_hub_calls):
    pipe, folder = saved_repository

    result = pipe.push_to_hub("lightbagel-org/lightbagel-tiny", private=True)

    assert result == "commit-info"
    assert recorded_hub_calls["create_repo"] == {
        "repo_id": "lightbagel-org/lightbagel-tiny",
        "private": True,
        "exist_ok": True,
    }
    upload = recorded_hub_calls["upload_folder"]
    assert upload["repo_id"] == "lightbagel-org/lightbagel-tiny"
    assert upload["files"] == _files(folder)
    assert upload["commit_message"] == "Upload LightBagelPipeline"


def test_push_to_hub_model_card(saved_repository, recorded_hub_calls):
    pipe, _ = saved_repository
    pipe.push_to_hub("lightbagel-org/lightbagel-tiny")

    card = ModelCard(recorded_hub_calls["upload_folder"]["card"])
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image"
    assert {"text-to-image", "image-to-image"} <= set(card.data.tags)
    assert card.data.base_model == ["Qwen/Qwen2.5-VL-7B-Instruct", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"]
    assert card.data.license == "apache-2.0"
    assert 'LightBagelPipeline.from_pretrained(\n    "lightbagel-org/lightbagel-tiny"' in card.text
    assert 'custom_pipeline="pipeline_lightbagel", trust_remote_code=True' in card.text


def test_push_to_hub_edit_card_tag(saved_repository, recorded_hub_calls):
    pipe, _ = saved_repository
    LightBagelEditPipeline(**pipe.components).push_to_hub("lightbagel-org/edit", license="other")

    card = ModelCard(recorded_hub_calls["upload_folder"]["card"])
    assert card.data.pipeline_tag == "image-to-image"
    assert card.data.license == "other"
    assert "LightBagelEditPipeline.from_pretrained(" in card.text


def test_save_pretrained_push_flag_uploads(saved_repository, recorded_hub_calls, tmp_path):
    pipe, _ = saved_repository
    pipe.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="lightbagel-org/pushed")

    assert recorded_hub_calls["upload_folder"]["repo_id"] == "lightbagel-org/pushed"
    assert (tmp_path / "pushed" / "model_index.json").is_file()


# ------------------------------------------------------------------------------------------- broken repositories
def test_missing_component_folder_named(repository_copy):
    shutil.rmtree(repository_copy / "vae")

    with pytest.raises(LightBagelRepositoryError, match=r"component folder vae/ is missing") as raised:
        LightBagelPipeline.from_pretrained(repository_copy)

    assert raised.value.file == "vae/"
    assert raised.value.field == "vae"


def test_missing_folder_allowed_when_passed(saved_repository, repository_copy):
    pipe, _ = saved_repository
    shutil.rmtree(repository_copy / "vae")

    loaded = LightBagelPipeline.from_pretrained(repository_copy, vae=pipe.vae)

    assert loaded.vae is pipe.vae


def test_unknown_config_field_named(repository_copy):
    config_path = repository_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["fusion_gate_type"] = "tanh"
    config_path.write_text(json.dumps(config))

    with pytest.raises(LightBagelRepositoryError, match="fusion_gate_type") as raised:
        LightBagelPipeline.from_pretrained(repository_copy)

    assert raised.value.file == "transformer/config.json"
    assert raised.value.field == "fusion_gate_type"


def test_newer_repository_suggests_upgrade(repository_copy):
    index_path = repository_copy / "model_index.json"
    model_index = json.loads(index_path.read_text())
    model_index["_diffusers_lightbagel_version"] = "9.0.0"
    index_path.write_text(json.dumps(model_index))
    config_path = repository_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["fusion_gate_type"] = "tanh"
    config_path.write_text(json.dumps(config))

    with pytest.raises(LightBagelRepositoryError, match=r"saved by diffusers-lightbagel 9\.0\.0.*pip install -U"):
        LightBagelPipeline.from_pretrained(repository_copy)


def test_shape_mismatch_named(repository_copy):
    config_path = repository_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["ffn_dim"] = config["ffn_dim"] * 2
    config_path.write_text(json.dumps(config))

    expected = r"tensor 'blocks\.0\.ffn\.net\.0\.proj\.(weight|bias)' has shape"
    with pytest.raises(LightBagelRepositoryError, match=expected):
        LightBagelPipeline.from_pretrained(repository_copy)


def test_missing_tensor_named(repository_copy):
    weights_path = repository_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_path)
    del state["fusion_blocks.1.generation.to_out.weight"]
    save_file(state, weights_path)

    with pytest.raises(LightBagelRepositoryError, match="fusion_blocks.1.generation.to_out.weight") as raised:
        LightBagelPipeline.from_pretrained(repository_copy)

    assert raised.value.file == "transformer/diffusion_pytorch_model.safetensors"


def test_unknown_component_named(repository_copy):
    index_path = repository_copy / "model_index.json"
    model_index = json.loads(index_path.read_text())
    model_index["refiner"] = ["diffusers", "LightBagelRefinerModel"]
    index_path.write_text(json.dumps(model_index))

    with pytest.raises(LightBagelRepositoryError, match="'refiner'") as raised:
        LightBagelPipeline.from_pretrained(repository_copy)

    assert raised.value.field == "refiner"


def test_inconsistent_vlm_depth_named(repository_copy):
    config_path = repository_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["vlm_num_layers"] = 5
    config_path.write_text(json.dumps(config))

    expected = "vlm_num_layers=5 but vlm/config.json has num_hidden_layers=3"
    with pytest.raises(LightBagelRepositoryError, match=expected):
        LightBagelPipeline.from_pretrained(repository_copy)


def test_missing_model_index_named(repository_copy):
    (repository_copy / "model_index.json").unlink()

    with pytest.raises(LightBagelRepositoryError, match="model_index.json is missing"):
        validate_repository(repository_copy)


# ---------------------------------------------------------------------------------------------------- pipelines/
def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightbagel_pipelines_generate", PIPELINES_FOLDER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _comparable(path: Path):
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data.pop("_diffusers_version", None)
        return data
    return path.read_text()


def test_repository_skeletons_up_to_date(tmp_path):
    _load_generator().generate(tmp_path)

    for variant in ("lightbagel-7b", "lightbagel-tiny"):
        generated, stored = tmp_path / variant, PIPELINES_FOLDER / variant
        assert _files(generated) == _files(stored), variant
        for name in _files(generated):
            assert _comparable(generated / name) == _comparable(stored / name), f"{variant}/{name}"


def test_full_size_transformer_matches_wan(tmp_path):
    config = json.loads((PIPELINES_FOLDER / "lightbagel-7b" / "transformer" / "config.json").read_text())
    wan_config = {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "in_channels": 48,
        "out_channels": 48,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 14336,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-06,
    }
    with torch.device("meta"):
        lightbagel = LightBagelTransformer2DModel.from_config(config)
        wan = WanTransformer3DModel.from_config(wan_config)
    ours = {name: tuple(tensor.shape) for name, tensor in lightbagel.state_dict().items()}
    theirs = {name: tuple(tensor.shape) for name, tensor in wan.state_dict().items()}
    text_projection = "condition_embedder.text_embedder.linear_1.weight"

    assert config["num_layers"] == 30
    assert config["vlm_num_layers"] == 28
    assert set(theirs) <= set(ours)
    assert {name.split(".")[0] for name in set(ours) - set(theirs)} == {"fusion_blocks"}
    assert {name for name in theirs if ours[name] != theirs[name]} == {text_projection}
    assert ours[text_projection] == (3072, 3584)
    assert theirs[text_projection] == (3072, 4096)
    assert len(lightbagel.fusion_blocks) == 30


def test_full_size_vae_config_is_wan22(tmp_path):
    config = json.loads((PIPELINES_FOLDER / "lightbagel-7b" / "vae" / "config.json").read_text())

    assert (config["z_dim"], config["base_dim"], config["decoder_base_dim"]) == (48, 160, 256)
    assert (config["patch_size"], config["scale_factor_spatial"], config["is_residual"]) == (2, 16, True)
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 48
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(config)
    assert vae.config.in_channels == 12
