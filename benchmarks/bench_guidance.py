"""Guidance branches in one batched transformer forward against one forward per branch.

`batch_guidance_branches=True` (the default) concatenates the guidance branches along the batch: 2 for
text-to-image (prompt, negative prompt), 3 for editing (full context, no instruction, no image). False runs them
one after the other. The script reports the wall time of a pipeline call and two peak-memory figures for each:

- peak tensor memory: the most bytes of tensors created during the call that were alive at once, counted with a
  TorchDispatchMode (benchmarks/_common.py). Weights and inputs are not in it. This is the figure to compare.
- peak RSS increase: the process resident set size sampled every 2 ms by psutil, minus the size before the call.
  Coarse: the allocator keeps freed pages, and a sampler can miss a short peak.

    python benchmarks/bench_guidance.py [--size 512 --steps 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, mib, peak_rss_delta_bytes, peak_tensor_bytes, print_table, set_threads  # noqa: E402
from _common import time_interleaved  # noqa: E402
from _medium import PROMPT, build_medium_pipeline  # noqa: E402

from diffusers_lightbagel import LightBagelEditPipeline  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels; 512 is 256 latent tokens")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    pipe = build_medium_pipeline()
    edit_pipe = LightBagelEditPipeline(**pipe.components)
    edit_pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8))
    common = dict(
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_interval=(0.0, 1.0),
        output_type="latent",
    )

    def call(task: str, batched: bool):
        def run():
            generator = torch.Generator().manual_seed(0)
            if task == "text-to-image":
                pipe(PROMPT, generator=generator, batch_guidance_branches=batched, **common)
            else:
                edit_pipe(image, "make it blue", generator=generator, batch_guidance_branches=batched, **common)

        return run

    rows, measured = [], {}
    for task, branches in (("text-to-image", 2), ("edit", 3)):
        functions = {"batched": call(task, True), "sequential": call(task, False)}
        times = time_interleaved(functions, repeats=args.repeats)
        for mode, function in functions.items():
            tensor_peak = peak_tensor_bytes(function)
            rss_peak = peak_rss_delta_bytes(function)
            measured[(task, mode)] = {"time_s": times[mode], "tensor_peak": tensor_peak, "rss_peak": rss_peak}
            rows.append([task, branches, mode, f"{times[mode] * 1e3:.0f}", mib(tensor_peak), mib(rss_peak)])
        ratio = times["sequential"] / times["batched"]
        memory_ratio = measured[(task, "batched")]["tensor_peak"] / measured[(task, "sequential")]["tensor_peak"]
        rows.append([task, branches, "sequential / batched time; batched / sequential memory", f"{ratio:.2f}",
                     f"{memory_ratio:.2f}", ""])

    print(f"Machine: {machine_line()}")
    print(
        f"Config: medium random-weight pipeline (see benchmarks/_medium.py), {args.size}x{args.size}, "
        f"{args.steps} steps, guidance on every step, output_type='latent', median of {args.repeats} calls"
    )
    print_table(
        "Guidance branches: one batched forward vs one forward per branch",
        ["task", "branches", "mode", "time (ms)", "peak tensor memory (MiB)", "peak RSS increase (MiB)"],
        rows,
    )
    return measured


if __name__ == "__main__":
    main()
