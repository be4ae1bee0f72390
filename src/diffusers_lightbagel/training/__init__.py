"""LoRA fine-tuning of LightBagel pipelines with accelerate; `main(argv)` is the `lightbagel train-lora` command."""

from .data import LightBagelLoraDataset, collate_examples
from .loss import LightBagelFlowMatchingModel, flow_matching_loss, sample_sigmas
from .train import build_parser, main, train


__all__ = [
    "LightBagelFlowMatchingModel",
    "LightBagelLoraDataset",
    "build_parser",
    "collate_examples",
    "flow_matching_loss",
    "main",
    "sample_sigmas",
    "train",
]
