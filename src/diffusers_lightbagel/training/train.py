"""LoRA fine-tuning of a LightBagel pipeline with `accelerate`: argument parsing, the training loop, checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import logging as std_logging
import math
import os
import re
import shutil
import tempfile

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import logging

from ..loaders.lora import default_lora_target_modules
from ..pipelines.image_utils import to_rgb_image
from ..pipelines.pipeline_lightbagel import LightBagelPipeline
from .data import LightBagelLoraDataset, collate_examples
from .loss import LightBagelFlowMatchingModel, flow_matching_loss


logger = logging.get_logger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightbagel train-lora",
        description="Train a LoRA on a LightBagel pipeline (text-to-image or edit data) with accelerate.",
    )
    data = parser.add_argument_group("model and data")
    data.add_argument("--pretrained-model", required=True, help="pipeline folder, or Hub repo id in the local cache")
    data.add_argument(
        "--train-data-dir",
        required=True,
        help="folder of images with caption .txt files, or with metadata.jsonl (text-to-image or edit triplets)",
    )
    data.add_argument("--output-dir", required=True, help="folder for the LoRA file, checkpoints and validation images")
    data.add_argument("--overwrite-output-dir", action="store_true", help="replace a LoRA file already in --output-dir")
    data.add_argument("--resolution", type=_positive_int, default=512, help="square training size in pixels")
    data.add_argument("--max-sequence-length", type=_positive_int, default=512, help="prompt tokens kept")
    data.add_argument("--dataloader-num-workers", type=int, default=0, help="data loading worker processes")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank")
    lora.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: the rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names, or one regular expression, for PEFT's target_modules "
        "(default: the fusion-block and DiT attention projections)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train-batch-size", type=_positive_int, default=1, help="examples per device and step")
    optim.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    optim.add_argument("--max-train-steps", type=_positive_int, default=1000, help="optimizer steps in total")
    optim.add_argument("--learning-rate", type=_positive_float, default=1e-4)
    optim.add_argument("--lr-scheduler", default="constant", help="a diffusers.optimization scheduler name")
    optim.add_argument("--lr-warmup-steps", type=int, default=0)
    optim.add_argument("--adam-weight-decay", type=float, default=1e-4)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 turns it off")
    optim.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument(
        "--weighting-scheme",
        choices=["uniform", "logit_normal"],
        default="uniform",
        help="distribution of the noise level before the shift",
    )
    optim.add_argument("--logit-mean", type=float, default=0.0)
    optim.add_argument("--logit-std", type=float, default=1.0)
    optim.add_argument(
        "--timestep-shift", type=_positive_float, default=None, help="flow-matching shift (default: the scheduler's)"
    )
    optim.add_argument(
        "--caption-dropout", type=float, default=0.0, help="probability of training on the empty prompt"
    )

    state = parser.add_argument_group("checkpoints, validation, logging")
    state.add_argument("--checkpointing-steps", type=_positive_int, default=500, help="save state every N steps")
    state.add_argument("--checkpoints-total-limit", type=_positive_int, default=None, help="keep the N newest")
    state.add_argument(
        "--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output-dir"
    )
    state.add_argument("--validation-prompt", default=None, help="prompt (or instruction) for validation images")
    state.add_argument("--validation-image", default=None, help="source image for edit validation")
    state.add_argument("--validation-steps", type=_positive_int, default=100, help="validate every N steps")
    state.add_argument("--validation-inference-steps", type=_positive_int, default=28, help="denoising steps")
    state.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard or wandb")
    state.add_argument(
        "--logging-steps", type=_positive_int, default=10, help="log the step, loss and learning rate every N steps"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise on option values that cannot work, before any model is loaded."""
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.resolution % 32 != 0:
        raise ValueError(f"--resolution must be a multiple of 32 (VAE 16x times DiT patch 2), got {args.resolution}.")
    lora_path = os.path.join(args.output_dir, LORA_FILE)
    if os.path.exists(lora_path) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise FileExistsError(
            f"{lora_path} already exists; pass --overwrite-output-dir to replace it, or --resume-from-checkpoint."
        )
    if args.validation_image is not None and not os.path.isfile(args.validation_image):
        raise FileNotFoundError(f"--validation-image {args.validation_image!r} does not exist.")


def parse_target_modules(value: str | None) -> str | list[str]:
    if value is None:
        return default_lora_target_modules()
    if "," in value:
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


def find_checkpoint(output_dir: str, requested: str) -> str | None:
    """Return the checkpoint folder to resume from: `requested` itself, or the newest one for 'latest'."""
    if requested != "latest":
        if not os.path.isdir(requested):
            raise FileNotFoundError(f"--resume-from-checkpoint {requested!r} is not a folder.")
        return requested
    if not os.path.isdir(output_dir):
        return None
    steps = [int(match.group(1)) for name in os.listdir(output_dir) if (match := CHECKPOINT_PATTERN.fullmatch(name))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def _remove_old_checkpoints(output_dir: str, keep: int) -> None:
    steps = sorted(int(m.group(1)) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.fullmatch(name)))
    for step in steps[: max(0, len(steps) - keep)]:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        logger.info(f"Removing checkpoint {path} (--checkpoints-total-limit {keep}).")
        shutil.rmtree(path)


def lora_state_dict_of(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the transformer's LoRA weights (full, on CPU) on the main process; gathers shards under FSDP."""
    full_state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    prefix = "transformer."
    transformer_state_dict = {
        key[len(prefix) :]: value for key, value in full_state_dict.items() if key.startswith(prefix) and "lora_" in key
    }
    transformer = accelerator.unwrap_model(model).transformer
    lora = get_peft_model_state_dict(transformer, state_dict=transformer_state_dict)
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in lora.items()}


def _register_checkpoint_hooks(accelerator: Accelerator, lora_config: LoraConfig) -> None:
    # Without FSDP, a checkpoint stores only the LoRA weights (in the format load_lora_weights reads) instead of the
    # whole frozen model. Under FSDP, accelerate saves the sharded model itself.
    if accelerator.distributed_type == DistributedType.FSDP:
        return

    def save_model_hook(models, weights, output_dir):
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            if accelerator.is_main_process and isinstance(unwrapped, LightBagelFlowMatchingModel):
                lora = get_peft_model_state_dict(unwrapped.transformer)
                LightBagelPipeline.save_lora_weights(
                    output_dir, lora, transformer_lora_adapter_metadata=lora_config.to_dict(), overwrite=True
                )
            if weights:
                weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            unwrapped = accelerator.unwrap_model(models.pop())
            state_dict = LightBagelPipeline.lora_state_dict(os.path.join(input_dir, LORA_FILE))
            state_dict = {key.removeprefix("transformer."): value for key, value in state_dict.items()}
            result = set_peft_model_state_dict(unwrapped.transformer, state_dict, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"The checkpoint in {input_dir} has LoRA keys this model lacks: {unexpected}.")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def _log_step(accelerator: Accelerator, step: int, max_steps: int, logs: dict[str, float]) -> None:
    # Every process must take part in the reduce; only the main process logs the mean over processes.
    loss = accelerator.reduce(torch.tensor(logs["loss"], device=accelerator.device), reduction="mean").item()
    if accelerator.is_main_process:
        logger.info(f"step {step}/{max_steps}: loss {loss:.4f}, learning rate {logs['lr']:.3g}")


def _write_image_atomically(image, path: str) -> None:
    directory = os.path.dirname(path)
    handle, temporary_path = tempfile.mkstemp(dir=directory, prefix=".validation-", suffix=".png")
    os.close(handle)
    try:
        image.save(temporary_path, format="PNG")
        os.replace(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise


def run_validation(args, accelerator: Accelerator, model: LightBagelFlowMatchingModel, step: int) -> list[str]:
    """Generate validation images with the current LoRA and write them to `output_dir/validation/`."""
    if accelerator.distributed_type == DistributedType.FSDP:
        logger.warning("Validation images are skipped under FSDP: the sharded transformer cannot run on one process.")
        return []
    if not accelerator.is_main_process:
        return []
    transformer = model.transformer
    was_training = transformer.training
    transformer.eval()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    common = dict(
        prompt=args.validation_prompt,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.validation_inference_steps,
        generator=generator,
    )
    with torch.no_grad(), accelerator.autocast():
        if args.validation_image is not None:
            image = model.edit_pipe(image=to_rgb_image(args.validation_image, "validation"), **common).images[0]
        else:
            image = model.pipe(**common).images[0]
    transformer.train(was_training)

    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    _write_image_atomically(image, path)
    logger.info(f"Wrote the validation image {path}.")
    return [path]


def prepare_pipeline(args, accelerator: Accelerator) -> tuple[LightBagelPipeline, LoraConfig]:
    """Load the pipeline, freeze it, cast frozen weights to the mixed-precision dtype and add the LoRA adapter."""
    weight_dtype = WEIGHT_DTYPES[args.mixed_precision]
    # The VAE stays in float32: the Wan VAE is small and loses accuracy in half precision.
    pipe = LightBagelPipeline.from_pretrained(
        args.pretrained_model, dtype={"default": weight_dtype, "vae": torch.float32}
    )
    pipe.set_progress_bar_config(disable=True)
    for component in (pipe.vlm, pipe.transformer, pipe.vae):
        component.requires_grad_(False)
        component.to(accelerator.device)

    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha or args.rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=parse_target_modules(args.target_modules),
    )
    try:
        pipe.transformer.add_adapter(lora_config)
    except ValueError as error:
        raise ValueError(f"--target-modules {args.target_modules!r} matches no transformer layer: {error}") from error
    if args.mixed_precision != "no":
        # Trainable LoRA weights stay in float32 while the frozen weights are in half precision.
        cast_training_params(pipe.transformer, dtype=torch.float32)
    return pipe, lora_config


def train(args: argparse.Namespace) -> str:
    """Run the training and return the path of the saved LoRA file."""
    check_args(args)
    dataset = LightBagelLoraDataset(args.train_data_dir, args.resolution)
    if dataset.is_edit and args.validation_prompt and args.validation_image is None:
        raise ValueError("The data are edit triplets: pass --validation-image with --validation-prompt.")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)

    pipe, lora_config = prepare_pipeline(args, accelerator)
    shift = args.timestep_shift or float(pipe.scheduler.config.get("shift", 1.0))
    model = LightBagelFlowMatchingModel(pipe, max_sequence_length=args.max_sequence_length)
    model.transformer.train()
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        if model.trains_understanding():
            # transformers checkpoints a layer only in training mode; Qwen2.5-VL has no dropout, so this changes
            # nothing else.
            pipe.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            pipe.vlm.train()

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    num_trainable = sum(parameter.numel() for parameter in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    _register_checkpoint_hooks(accelerator, lora_config)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("lightbagel-lora", config={k: v for k, v in vars(args).items() if v is not None})

    updates_per_epoch = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.warning(f"No checkpoint found in {args.output_dir}; starting a new training run.")
        else:
            accelerator.load_state(checkpoint)
            global_step = int(CHECKPOINT_PATTERN.search(os.path.basename(checkpoint.rstrip(os.sep))).group(1))
            logger.info(f"Resumed from {checkpoint} at step {global_step}.")

    logger.info(
        f"Training {num_trainable} LoRA parameters on {len(dataset)} {'edit' if dataset.is_edit else 'text-to-image'} "
        f"examples for {args.max_train_steps} steps on {accelerator.num_processes} processes."
    )
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    epoch = first_epoch
    # Sum and count of the micro-batch losses since the last optimizer step, so a step's loss averages them.
    step_loss_sum, step_micro_batches = 0.0, 0
    while global_step < args.max_train_steps:
        epoch_loader = dataloader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in epoch_loader:
            if args.caption_dropout > 0:
                drop = torch.rand(len(batch["prompts"])) < args.caption_dropout
                batch["prompts"] = ["" if dropped else text for dropped, text in zip(drop.tolist(), batch["prompts"])]
            with accelerator.accumulate(model):
                loss = flow_matching_loss(
                    model, pipe, batch, args.resolution, shift, args.weighting_scheme, args.logit_mean, args.logit_std
                )
                accelerator.backward(loss)
                step_loss_sum = step_loss_sum + loss.detach()
                step_micro_batches += 1
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {"loss": (step_loss_sum / step_micro_batches).item(), "lr": lr_scheduler.get_last_lr()[0]}
            step_loss_sum, step_micro_batches = 0.0, 0
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.3g}")
            accelerator.log(logs, step=global_step)
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                _log_step(accelerator, global_step, args.max_train_steps, logs)

            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                if args.checkpoints_total_limit is not None and accelerator.is_main_process:
                    _remove_old_checkpoints(args.output_dir, args.checkpoints_total_limit - 1)
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            if args.validation_prompt and global_step % args.validation_steps == 0:
                run_validation(args, accelerator, accelerator.unwrap_model(model), global_step)
            if global_step >= args.max_train_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    lora = lora_state_dict_of(accelerator, model)
    lora_path = os.path.join(args.output_dir, LORA_FILE)
    if accelerator.is_main_process:
        LightBagelPipeline.save_lora_weights(
            args.output_dir, lora, transformer_lora_adapter_metadata=lora_config.to_dict(), overwrite=True
        )
        logger.info(f"Saved the LoRA to {lora_path} after {global_step} training steps.")
    accelerator.end_training()
    return lora_path


@contextlib.contextmanager
def _command_logging():
    """Show this package's info logs on stderr on the main process, and only warnings on the others.

    The package's loggers sit outside the "diffusers" logger tree, so diffusers' verbosity settings do not reach
    them. Log lines go through `tqdm.write` so that they do not break the progress bar.
    """
    package_logger = std_logging.getLogger(__name__.split(".")[0])
    previous_level = package_logger.level
    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    package_logger.setLevel(std_logging.INFO if PartialState().is_main_process else std_logging.WARNING)
    package_logger.addHandler(handler)
    try:
        with logging_redirect_tqdm(loggers=[package_logger], tqdm_class=tqdm):
            yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (the options after `lightbagel train-lora`) and train; return the exit status."""
    args = build_parser().parse_args(argv)
    with _command_logging():
        train(args)
    return 0
