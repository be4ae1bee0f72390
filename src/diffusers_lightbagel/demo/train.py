"""Training of the shapes demo model: the VAE first, then the DiT and fusion blocks, from one seed.

Stage 1 trains a small Wan2.2-style VAE (`AutoencoderKLWan`, 8x spatial compression) on rendered shapes with a
reconstruction loss and a small KL term, then records the per-channel latent mean and standard deviation in its
config. Stage 2 builds a LightBagel pipeline from the tiny random Qwen2.5-VL (frozen), that VAE (frozen) and a small
`LightBagelTransformer2DModel`, and trains every DiT and fusion parameter with the flow-matching loss on
text-to-image and edit examples together. The loss runs the project's own pieces: `LightBagelFlowMatchingModel`
(the VLM pass with the fusion blocks' understanding halves, under gradient, and the transformer with the edit
layout) and `sample_sigmas` from `diffusers_lightbagel.training`, on latents from the pipeline's
`encode_image_latents`.

Run `python -m diffusers_lightbagel.demo.train --output DIR` (see `--help`); `scripts/build_demo_model.sh` contains the
settings of the shipped model.
"""

from __future__ import annotations

import argparse
import copy
import logging as std_logging
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders import autoencoder_kl_wan
from diffusers.utils import logging

from ..pipelines.pipeline_lightbagel import LightBagelPipeline
from ..tiny import build_tiny_processor, build_tiny_transformer, build_tiny_vlm
from ..training.loss import LightBagelFlowMatchingModel, sample_sigmas
from . import shapes
from ..models.transformer_lightbagel import LightBagelTransformer2DModel


# Named explicitly so that `python -m` (where __name__ is "__main__") logs under the package as well.
logger = logging.get_logger("diffusers_lightbagel.demo.train")

LATENT_CHANNELS = 16
SCHEDULER_SHIFT = 1.0


def build_vae(seed: int) -> AutoencoderKLWan:
    """Return an untrained Wan2.2-style VAE with 8x spatial compression: 2x2 patchify, then two 2x downsamplings."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, False],
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=8,
    )


def build_transformer(seed: int) -> LightBagelTransformer2DModel:
    """Return an untrained LightBagel transformer sized for the tiny VLM: 4 blocks of width 128."""
    return build_tiny_transformer(
        seed=seed,
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        freq_dim=64,
        ffn_dim=384,
        num_layers=4,
        rope_max_seq_len=64,
    )


@contextmanager
def single_frame_convolutions():
    """Run the Wan VAE's causal 3D convolutions on one-frame inputs as the equivalent 2D convolutions.

    For a single frame without a feature cache, the causal padding puts zeros in every temporal tap but the last,
    so the 3D convolution equals a 2D convolution with the last temporal slice of the kernel. The result is the
    same up to float rounding, at about a third of the cost; training only ever uses single frames.
    """
    original_forward = autoencoder_kl_wan.WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        causal_padding = self._padding
        if cache_x is None and x.shape[2] == 1 and self.stride[0] == 1 and causal_padding[4] == self.kernel_size[0] - 1:
            padded = F.pad(x[:, :, 0], causal_padding[:4])
            weight = self.weight[:, :, -1]
            output = F.conv2d(padded, weight, self.bias, self.stride[1:], 0, self.dilation[1:], self.groups)
            return output.unsqueeze(2)
        return original_forward(self, x, cache_x)

    autoencoder_kl_wan.WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        autoencoder_kl_wan.WanCausalConv3d.forward = original_forward


def _pixels(images) -> torch.Tensor:
    """Stack PIL images into a (batch, 3, 1, height, width) tensor in [-1, 1]."""
    arrays = torch.stack([torch.from_numpy(shapes.to_array(image).copy()) for image in images])
    return (arrays.permute(0, 3, 1, 2).float() / 127.5 - 1.0).unsqueeze(2)


def _random_training_scene(rng: random.Random) -> tuple:
    if rng.random() < 0.5:
        return shapes.sample_caption_example(rng)[1]
    return rng.choice((shapes.sample_edit(rng).source, shapes.sample_edit(rng).target))


def train_vae(vae: AutoencoderKLWan, steps: int, batch_size: int, learning_rate: float, kl_weight: float, seed: int):
    """Train the VAE on rendered scenes (L1 + MSE reconstruction and `kl_weight` x KL) and return it in eval mode."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    start = time.time()
    with single_frame_convolutions():
        for step in range(1, steps + 1):
            lr = learning_rate * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels = _pixels([shapes.render(_random_training_scene(rng)) for _ in range(batch_size)])
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            # Shapes cover a few percent of the canvas. Without extra weight on their pixels, the VAE settles on a
            # blank white image early in training.
            weight = 1.0 + 9.0 * (pixels < 0.99).any(dim=1, keepdim=True).float()
            error = reconstruction - pixels
            reconstruction_loss = (weight * (error.abs() + error.square())).mean() / weight.mean()
            kl = posterior.kl().mean() / pixels[0].numel()
            loss = reconstruction_loss + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            if step % 25 == 0 or step == steps or step <= 3:
                logger.info(
                    f"vae step {step}/{steps}: reconstruction {reconstruction_loss.item():.4f}, kl {kl.item():.3f}, "
                    f"{time.time() - start:.0f} s"
                )
    return vae.eval()


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKLWan, num_images: int, seed: int) -> None:
    """Record the per-channel mean and standard deviation of the latents of `num_images` scenes in the VAE config."""
    rng = random.Random(seed)
    latents = []
    with single_frame_convolutions():
        for start in range(0, num_images, 64):
            count = min(64, num_images - start)
            pixels = _pixels([shapes.render(_random_training_scene(rng)) for _ in range(count)])
            latents.append(vae.encode(pixels).latent_dist.mode())
    latents = torch.cat(latents)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()], latents_std=[round(v, 5) for v in std.tolist()])


def build_pipeline(vae: AutoencoderKLWan, seed: int) -> LightBagelPipeline:
    """Assemble the demo pipeline around a trained VAE: tiny random VLM, new transformer, flow-matching scheduler."""
    processor = build_tiny_processor()
    vlm = build_tiny_vlm(processor.tokenizer, seed=seed)
    transformer = build_transformer(seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)
    pipe = LightBagelPipeline(vlm=vlm, processor=processor, transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.default_height = pipe.default_width = shapes.IMAGE_SIZE
    return pipe


@torch.no_grad()
def _encode_images(pipe: LightBagelPipeline, images: list) -> torch.Tensor:
    size = shapes.IMAGE_SIZE
    latents = []
    with single_frame_convolutions():
        for start in range(0, len(images), 128):
            latents.append(pipe.encode_image_latents(images[start : start + 128], size, size, "cpu"))
    return torch.cat(latents)


class ShapesTrainingSet:
    """Rendered text-to-image and edit examples with their latents, encoded once by the pipeline's VAE."""

    def __init__(self, pipe: LightBagelPipeline, num_captions: int, num_edits: int, seed: int):
        rng = random.Random(seed)
        captions = [shapes.sample_caption_example(rng) for _ in range(num_captions)]
        edits = [shapes.sample_edit(rng) for _ in range(num_edits)]
        self.prompts = [prompt.text for prompt, _ in captions]
        self.latents = _encode_images(pipe, [shapes.render(scene) for _, scene in captions])
        self.instructions = [edit.instruction for edit in edits]
        self.sources = [shapes.render(edit.source) for edit in edits]
        self.source_latents = _encode_images(pipe, self.sources)
        self.target_latents = _encode_images(pipe, [shapes.render(edit.target) for edit in edits])


def _velocity_loss(model, prompts, latents, sigma_generator, sources=None, reference_latents=None) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=sigma_generator)
    sigmas = sample_sigmas(latents.shape[0], SCHEDULER_SHIFT, "logit_normal", generator=sigma_generator)
    noisy_latents = (1 - sigmas.view(-1, 1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1, 1) * noise
    timestep = sigmas * 1000.0
    prediction = model(prompts, noisy_latents, timestep, sources=sources, reference_latents=reference_latents)
    return F.mse_loss(prediction, noise - latents)


def _drop(texts: list[str], rate: float, rng: random.Random) -> list[str]:
    return ["" if rng.random() < rate else text for text in texts]


def save_pipeline(pipe: LightBagelPipeline, output_dir: str) -> None:
    """Write the pipeline folder to a temporary sibling, then move it into place, replacing an older one."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".lightbagel-shapes-", dir=parent)
    try:
        pipe.save_pretrained(staging)
        if os.path.isdir(output_dir):
            retired = staging + "-old"
            os.replace(output_dir, retired)
            os.replace(staging, output_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def scheduled_learning_rate(step: int, steps: int, peak: float, warmup_steps: int, schedule: str) -> float:
    """Return the learning rate of 1-based `step`: linear warm-up to `peak`, then constant or a half cosine to zero."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"Invalid learning-rate schedule {schedule!r}. Expected 'constant' or 'cosine'.")
    lr = peak * min(1.0, step / max(warmup_steps, 1))
    if schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return lr


def train_transformer(
    pipe: LightBagelPipeline,
    data: ShapesTrainingSet,
    steps: int,
    batch_size: int,
    learning_rate: float,
    caption_dropout: float,
    ema_decay: float,
    seed: int,
    output_dir: str | None = None,
    save_every: int = 0,
    lr_schedule: str = "constant",
    warmup_steps: int = 200,
) -> LightBagelPipeline:
    """Train the DiT and fusion blocks with flow matching, one text-to-image and one edit batch per step.

    The learning rate rises linearly over `warmup_steps`, then stays at `learning_rate` (`lr_schedule="constant"`)
    or follows a half cosine down to zero at the last step (`"cosine"`). Returns the pipeline holding the
    exponential moving average of the weights, which is also what is saved every `save_every` steps.
    """
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    transformer = pipe.transformer
    pipe.vlm.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    transformer.requires_grad_(True)
    transformer.train()
    model = LightBagelFlowMatchingModel(pipe, max_sequence_length=128)
    ema = copy.deepcopy(transformer).requires_grad_(False).eval()
    ema_pipe = LightBagelPipeline(**{**pipe.components, "transformer": ema})
    ema_pipe.default_height = ema_pipe.default_width = shapes.IMAGE_SIZE

    parameters = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.99))
    num_captions, num_edits = data.latents.shape[0], data.source_latents.shape[0]
    start = time.time()
    running = None
    for step in range(1, steps + 1):
        lr = scheduled_learning_rate(step, steps, learning_rate, warmup_steps, lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        caption_index = [rng.randrange(num_captions) for _ in range(batch_size)]
        prompts = _drop([data.prompts[i] for i in caption_index], caption_dropout, rng)
        loss_t2i = _velocity_loss(model, prompts, data.latents[caption_index], generator)

        edit_index = [rng.randrange(num_edits) for _ in range(batch_size)]
        instructions = _drop([data.instructions[i] for i in edit_index], caption_dropout, rng)
        loss_edit = _velocity_loss(
            model,
            instructions,
            data.target_latents[edit_index],
            generator,
            sources=[data.sources[i] for i in edit_index],
            reference_latents=data.source_latents[edit_index],
        )

        loss = loss_t2i + loss_edit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema.parameters(), transformer.parameters()):
                ema_parameter.lerp_(parameter, 1 - decay)

        values = torch.stack([loss_t2i.detach(), loss_edit.detach()])
        running = values if running is None else 0.98 * running + 0.02 * values
        if step % 50 == 0 or step == steps or step <= 3:
            logger.info(
                f"dit step {step}/{steps}: text-to-image loss {running[0]:.4f}, edit loss {running[1]:.4f}, "
                f"learning rate {lr:.2e}, {time.time() - start:.0f} s"
            )
        if output_dir and save_every and (step % save_every == 0 or step == steps):
            save_pipeline(ema_pipe, output_dir)
            logger.info(f"saved the step-{step} moving-average weights to {output_dir}")
    transformer.eval()
    return ema_pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_lightbagel.demo.train",
        description="Train the LightBagel shapes demo model (VAE, then DiT and fusion blocks) from a seed.",
    )
    parser.add_argument("--output", required=True, help="pipeline folder to write (replaced atomically)")
    parser.add_argument("--work-dir", default=None, help="folder for the stage-1 VAE (default: OUTPUT.work)")
    parser.add_argument("--stage", choices=("all", "vae", "transformer"), default="all", help="stages to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    parser.add_argument("--vae-steps", type=int, default=3000, help="VAE optimisation steps")
    parser.add_argument("--vae-batch-size", type=int, default=32, help="images per VAE step")
    parser.add_argument("--vae-learning-rate", type=float, default=2e-3, help="peak VAE learning rate")
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term (per pixel value)")
    parser.add_argument("--steps", type=int, default=4000, help="transformer optimisation steps")
    parser.add_argument("--batch-size", type=int, default=32, help="text-to-image and edit examples per step, each")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="transformer learning rate")
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="transformer learning rate after the warm-up: constant, or a half cosine down to zero at the last step",
    )
    parser.add_argument("--warmup-steps", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="rate of empty prompts, for guidance")
    parser.add_argument("--ema-decay", type=float, default=0.998, help="decay of the weight moving average")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of the training examples (default: seed + 2)")
    parser.add_argument("--num-captions", type=int, default=8000, help="text-to-image training examples")
    parser.add_argument("--num-edits", type=int, default=6000, help="edit training triplets")
    parser.add_argument("--save-every", type=int, default=500, help="write the pipeline every this many steps")
    parser.add_argument(
        "--resume-from",
        default=None,
        help="pipeline folder written by an earlier run: train its transformer further with its VAE (stage 2 only)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more than the free cores slows training down)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("vae_steps", "vae_batch_size", "steps", "batch_size", "num_captions", "num_edits", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}.")
    if args.warmup_steps < 0:
        raise SystemExit(f"error: --warmup-steps must be at least 0; got {args.warmup_steps}.")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise SystemExit(f"error: --caption-dropout must be in [0, 1); got {args.caption_dropout}.")
    # The package's loggers sit outside the "diffusers" logger tree, so the command configures them itself.
    package_logger = std_logging.getLogger("diffusers_lightbagel")
    package_logger.setLevel(std_logging.INFO)
    if not package_logger.handlers:
        handler = std_logging.StreamHandler()
        handler.setFormatter(std_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        package_logger.addHandler(handler)
    torch.set_num_threads(args.threads)
    work_dir = args.work_dir or args.output.rstrip("/") + ".work"
    vae_dir = os.path.join(work_dir, "vae")

    if args.stage in ("all", "vae"):
        vae = train_vae(
            build_vae(args.seed), args.vae_steps, args.vae_batch_size, args.vae_learning_rate, args.kl_weight, args.seed
        )
        set_latent_statistics(vae, 1024, args.seed + 1)
        os.makedirs(work_dir, exist_ok=True)
        vae.save_pretrained(vae_dir)
        logger.info(f"saved the VAE to {vae_dir}")
        if args.stage == "vae":
            return 0

    if args.resume_from:
        # Continue from a saved demo pipeline: its VAE and its (moving-average) transformer weights.
        vae = AutoencoderKLWan.from_pretrained(args.resume_from, subfolder="vae").eval()
        pipe = build_pipeline(vae, args.seed)
        pipe.transformer = LightBagelTransformer2DModel.from_pretrained(args.resume_from, subfolder="transformer")
        pipe.register_modules(transformer=pipe.transformer)
    else:
        vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()
        pipe = build_pipeline(vae, args.seed)
    data_seed = args.seed + 2 if args.data_seed is None else args.data_seed
    data = ShapesTrainingSet(pipe, args.num_captions, args.num_edits, data_seed)
    logger.info(f"encoded {args.num_captions} text-to-image and {args.num_edits} edit examples")
    ema_pipe = train_transformer(
        pipe,
        data,
        args.steps,
        args.batch_size,
        args.learning_rate,
        args.caption_dropout,
        args.ema_decay,
        args.seed + 3,
        output_dir=args.output,
        save_every=args.save_every,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
    )
    save_pipeline(ema_pipe, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
