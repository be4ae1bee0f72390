from .lora import DEFAULT_LORA_TARGET_MODULES, LightBagelLoraLoaderMixin, default_lora_target_modules
from .lora_conversion import check_lora_state_dict, convert_lora_state_dict


__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "LightBagelLoraLoaderMixin",
    "check_lora_state_dict",
    "convert_lora_state_dict",
    "default_lora_target_modules",
]
