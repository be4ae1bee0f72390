"""LoRA loading, saving and blending for the LightBagel pipelines, on diffusers' `LoraBaseMixin` and PEFT."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import safetensors.torch
import torch
from huggingface_hub import constants as hub_constants

from diffusers.loaders.lora_base import (
    LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME_SAFE,
    LoraBaseMixin,
    _fetch_state_dict,
    _pack_dict_with_prefix,
)
from diffusers.utils import USE_PEFT_BACKEND, logging

from .lora_conversion import check_lora_state_dict, convert_lora_state_dict


logger = logging.get_logger(__name__)

# The projections of both fusion-block halves and of the DiT's self- and cross-attention, as PEFT target patterns.
DEFAULT_LORA_TARGET_MODULES = (
    r"fusion_blocks\.\d+\.(understanding|generation)\.(to_q|to_k|to_v|to_out)",
    r"blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
)


def default_lora_target_modules() -> str:
    """Return the default training targets as one regular expression, the form PEFT's `target_modules` accepts."""
    return "^(" + "|".join(DEFAULT_LORA_TARGET_MODULES) + ")$"


def _atomic_save_function(overwrite: bool) -> Callable[[dict, str], None]:
    def save(state_dict: dict, path: str, metadata: dict | None = None) -> None:
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        directory = os.path.dirname(path) or "."
        handle, temporary_path = tempfile.mkstemp(dir=directory, prefix=".lora-", suffix=".tmp")
        os.close(handle)
        try:
            if path.endswith(".safetensors"):
                safetensors.torch.save_file(state_dict, temporary_path, metadata=metadata)
            else:
                torch.save(state_dict, temporary_path)
            os.replace(temporary_path, path)
        except BaseException:
            if os.path.exists(temporary_path):
                os.remove(temporary_path)
            raise

    return save


class LightBagelLoraLoaderMixin(LoraBaseMixin):
    """Load, save, blend, fuse and unload LoRA adapters on the `transformer` of a LightBagel pipeline.

    Adapters may target any linear layer of `LightBagelTransformer2DModel`: the DiT blocks, and both halves of the
    fusion blocks. The understanding halves run inside the VLM call (`encode_prompt`), so a LoRA on them changes
    the context as well as the denoising steps. The VLM itself carries no adapters.

    `set_adapters`, `disable_lora`, `enable_lora`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`,
    `delete_adapters` and `get_active_adapters` are those of `LoraBaseMixin`.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        **kwargs,
    ):
        """Read a LoRA file and return its state dict in the diffusers layout (`transformer.<module>.lora_A.weight`).

        Args:
            pretrained_model_name_or_path_or_dict: a `.safetensors` file, a folder containing one, a Hub repo id
                (read from the local cache when `HF_HUB_OFFLINE=1`), or a state dict.
            weight_name: the file name inside a folder or repo; needed when it contains several `.safetensors` files.
            subfolder, cache_dir, local_files_only, revision, token, force_download, proxies: as in
                `huggingface_hub.hf_hub_download`.
            return_lora_metadata: also return the adapter metadata (the `LoraConfig` fields) stored in the file.

        Original Wan key names and kohya-style names are converted; see `lora_conversion`.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        weight_name = kwargs.pop("weight_name", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        allow_pickle = use_safetensors is None
        local_files_only = kwargs.pop("local_files_only", None)
        offline = bool(local_files_only) or hub_constants.HF_HUB_OFFLINE
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if isinstance(source, str) and os.path.isfile(source):
            # _fetch_state_dict reads a file path only as folder + weight_name.
            source, weight_name = os.path.dirname(source) or ".", os.path.basename(source)
        elif isinstance(source, str) and not os.path.isdir(source) and weight_name is None and offline:
            # Offline, diffusers cannot list a Hub repo's files; look for the file name this library writes.
            weight_name = LORA_WEIGHT_NAME_SAFE

        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source,
            weight_name=weight_name,
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=local_files_only,
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=allow_pickle,
        )
        if kwargs:
            raise TypeError(f"lora_state_dict got unexpected keyword arguments {sorted(kwargs)}.")

        state_dict = convert_lora_state_dict(state_dict)
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load a LoRA into the transformer as adapter `adapter_name` and make it active.

        Every key is checked against the transformer before any layer changes: keys that name no linear layer, or
        whose shapes do not fit it, are listed in the `ValueError`. Other arguments are those of `lora_state_dict`,
        plus `low_cpu_mem_usage` and `hotswap` as in diffusers' `load_lora_weights`.
        """
        if not USE_PEFT_BACKEND:
            raise ValueError("Loading LoRA weights needs the PEFT backend; install `peft`.")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)

        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        metadata = self._transformer_adapter_metadata(metadata)
        transformer = getattr(self, self.transformer_name)
        check_lora_state_dict(state_dict, transformer)
        if adapter_name is not None and adapter_name in getattr(transformer, "peft_config", {}) and not hotswap:
            raise ValueError(
                f"An adapter named {adapter_name!r} is already loaded; choose another adapter_name, or remove it "
                "first with delete_adapters."
            )
        self.load_lora_into_transformer(
            state_dict,
            transformer=transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def _transformer_adapter_metadata(cls, metadata: dict | None) -> dict | None:
        """Return the file's adapter metadata with `transformer.`-prefixed keys, or None if it has no usable config.

        `save_lora_weights` (like diffusers' `_save_lora_weights`) stores the `LoraConfig` fields as
        `transformer.<field>`, and diffusers' `load_lora_adapter` (0.42.1) strips that prefix again. A file written
        by the model's own `save_lora_adapter` stores the fields without a prefix, so they get one here.
        """
        if not metadata:
            return None
        prefix = f"{cls.transformer_name}."
        if any(key.startswith(prefix) for key in metadata):
            fields = {key.removeprefix(prefix) for key in metadata if key.startswith(prefix)}
        else:
            fields = set(metadata)
            metadata = _pack_dict_with_prefix(metadata, cls.transformer_name)
        if "target_modules" not in fields:
            logger.warning(
                f"The LoRA file's adapter metadata has no {prefix}target_modules (fields: {sorted(metadata)}); "
                "ignoring it and reading rank and targets from the weights, with lora_alpha equal to the rank."
            )
            return None
        return metadata

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: dict[str, torch.Tensor],
        transformer,
        adapter_name: str | None = None,
        _pipeline=None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        metadata: dict | None = None,
    ) -> None:
        """Inject the `transformer.`-prefixed LoRA layers of `state_dict` into `transformer` through PEFT."""
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
            prefix=cls.transformer_name,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor | torch.nn.Module] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write the transformer's LoRA layers to `save_directory/weight_name` in the format `load_lora_weights` reads.

        Args:
            transformer_lora_layers: the LoRA state dict, from `peft.get_peft_model_state_dict(pipe.transformer)`.
            transformer_lora_adapter_metadata: the adapter's `LoraConfig.to_dict()`. It is stored in the file as
                `transformer.<field>`, and `load_lora_weights` builds the adapter from it, so rank, `lora_alpha`
                and target modules load back exactly. Without it, the loader reads the rank from the weights and
                sets `lora_alpha` to the rank. It needs `safe_serialization=True` and the default `save_function`.
            weight_name: defaults to `pytorch_lora_weights.safetensors`.
            overwrite: replace an existing file of that name; without it an existing file raises
                `FileExistsError`. The file is written to a temporary name first and then moved into place.
        """
        if not transformer_lora_layers:
            raise ValueError("transformer_lora_layers is empty; pass the LoRA state dict of the transformer.")
        if transformer_lora_adapter_metadata is not None:
            _check_adapter_metadata(transformer_lora_adapter_metadata, safe_serialization, save_function)
        if not is_main_process:
            return
        weight_name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
        path = os.path.join(os.fspath(save_directory), weight_name)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        if save_function is None:
            atomic_save = _atomic_save_function(overwrite)
            if safe_serialization:
                # write_lora_layers passes the adapter metadata only to its own save function, so add it here.
                save_function = _SafetensorsSaveWithMetadata(atomic_save, transformer_lora_adapter_metadata)
            else:
                save_function = atomic_save

        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: None},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] = ["transformer"],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the active (or the named) adapters into the transformer weights, scaled by `lora_scale`."""
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs) -> None:
        """Subtract the merged adapters from the transformer weights again."""
        super().unfuse_lora(components=components, **kwargs)


ADAPTER_METADATA_REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")


def _check_adapter_metadata(metadata: dict, safe_serialization: bool, save_function: Callable | None) -> None:
    if not isinstance(metadata, dict):
        raise TypeError(
            f"transformer_lora_adapter_metadata must be a dict such as LoraConfig.to_dict(), got {type(metadata)}."
        )
    missing = [name for name in ADAPTER_METADATA_REQUIRED_FIELDS if name not in metadata]
    if missing:
        raise ValueError(
            f"transformer_lora_adapter_metadata is missing the fields {missing}; pass the adapter's "
            "LoraConfig.to_dict(), for example pipe.transformer.peft_config[adapter_name].to_dict()."
        )
    if not safe_serialization:
        raise ValueError(
            "transformer_lora_adapter_metadata is stored only in .safetensors files; pass safe_serialization=True, "
            "or drop the metadata."
        )
    if save_function is not None:
        raise ValueError(
            "transformer_lora_adapter_metadata is written only by the default save function; drop save_function, "
            "or drop the metadata."
        )


class _SafetensorsSaveWithMetadata:
    """A `save_function` for `write_lora_layers` that stores the adapter config as diffusers does."""

    def __init__(self, save: Callable, adapter_metadata: dict | None):
        self.save = save
        self.adapter_metadata = adapter_metadata

    def __call__(self, state_dict: dict, path: str) -> None:
        import json

        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        metadata = {"format": "pt"}
        if self.adapter_metadata:
            fields = {
                name: list(value) if isinstance(value, set) else value for name, value in self.adapter_metadata.items()
            }
            prefixed = _pack_dict_with_prefix(fields, LightBagelLoraLoaderMixin.transformer_name)
            metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(prefixed, indent=2, sort_keys=True)
        self.save(state_dict, path, metadata)
