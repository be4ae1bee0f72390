"""Memory features on this machine: group offloading, VAE tiling and slicing, model and sequential CPU offload.

For each setting the script runs a full pipeline call (VLM, denoising, VAE decode) and reports wall time, peak
tensor memory (bytes of tensors created during the call and alive at once, counted with a TorchDispatchMode; weights
are not in it) and the largest pixel difference to the plain run. On a CPU-only machine group offloading with
onload_device=cpu moves nothing, so it shows the hooks' overhead, not a saving. Model and sequential CPU offload
need an accelerator in diffusers; the script reports what diffusers does when there is none.

    python benchmarks/bench_memory.py [--size 1024 --images 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, mib, peak_tensor_bytes, print_table, set_threads  # noqa: E402
from _medium import PROMPT, build_medium_pipeline  # noqa: E402


def enable_block_group_offload(pipe):
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)


def enable_leaf_group_offload(pipe):
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")


def enable_vae_tiling(pipe):
    pipe.vae.enable_tiling(
        tile_sample_min_height=256, tile_sample_min_width=256, tile_sample_stride_height=192, tile_sample_stride_width=192
    )


def enable_vae_slicing(pipe):
    pipe.vae.enable_slicing()


SETTINGS = {
    "plain": None,
    "group offload, block_level (onload cpu)": enable_block_group_offload,
    "group offload, leaf_level (onload cpu)": enable_leaf_group_offload,
    "VAE slicing": enable_vae_slicing,
    "VAE tiling (256 px tiles, 192 px stride)": enable_vae_tiling,
}


def offload_without_accelerator() -> list[list[str]]:
    rows = []
    pipe = build_medium_pipeline()
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        try:
            getattr(pipe, method)()
            rows.append([method, f"enabled; execution device {pipe._execution_device}"])
        except RuntimeError as error:
            rows.append([method, f"RuntimeError: {error}"])
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2, help="num_images_per_prompt; slicing decodes one at a time")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    rows, measured, reference = [], {}, None
    for name, enable in SETTINGS.items():
        pipe = build_medium_pipeline()
        if enable is not None:
            enable(pipe)
        output = {}

        def run():
            output["images"] = pipe(
                PROMPT,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                num_images_per_prompt=args.images,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images

        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        peak = peak_tensor_bytes(run)
        images = output["images"]
        if reference is None:
            reference = images
        difference = float((images - reference).abs().max())
        measured[name] = {"time_s": elapsed, "tensor_peak": peak, "max_abs_difference": difference}
        rows.append([name, f"{elapsed * 1e3:.0f}", mib(peak), f"{difference:.2e}"])

    print(f"Machine: {machine_line()}")
    print(
        f"Config: medium random-weight pipeline (see benchmarks/_medium.py) with the tiny Wan2.2-style VAE, "
        f"{args.images} images of {args.size}x{args.size}, {args.steps} steps, output_type='pt'"
    )
    print_table(
        "Memory settings: time, peak tensor memory, difference to the plain run",
        ["setting", "time (ms)", "peak tensor memory (MiB)", "max abs pixel difference (0-1 scale)"],
        rows,
    )
    print_table("Model and sequential CPU offload without an accelerator", ["method", "result"],
                offload_without_accelerator())
    return measured


if __name__ == "__main__":
    main()
