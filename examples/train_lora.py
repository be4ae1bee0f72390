"""Train a LoRA on a LightBagel pipeline.

Single process:
    python examples/train_lora.py --pretrained-model path/to/lightbagel --train-data-dir data --output-dir lora-out

Several GPUs (see docs/lora.md for the options and the FSDP configuration):
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/train_lora.py \
        --pretrained-model path/to/lightbagel --train-data-dir data --output-dir lora-out --mixed-precision bf16
"""

import sys

from diffusers_lightbagel.training import main


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
