"""Context cache: the VLM runs once per pipeline call, against a variant that re-encodes the context every step.

With the cache (the pipeline as built), the understanding context (the VLM's last hidden states and each fusion
block's understanding keys and values) is computed once and reused, so the cost of N steps grows with N only
through the DiT. The variant without the cache is built here, on the benchmark side: a forward pre-hook on the
transformer calls `pipe.encode_prompt` again before every step after the first and hands the fresh context to the
step. VLM forward calls are counted with a forward hook on the VLM.

    python benchmarks/bench_context_cache.py [--steps 1 4 16 --size 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, set_threads  # noqa: E402
from _medium import PROMPT, build_medium_pipeline  # noqa: E402

from diffusers_lightbagel import LightBagelContext  # noqa: E402


GUIDANCE = dict(guidance_scale=4.0, guidance_interval=(0.0, 1.0))


def add_reencoding_hook(pipe):
    """Make every transformer call after the first read a context that the VLM has just encoded again."""
    transformer = pipe.transformer
    state = {"calls": 0}

    def reencode(module, args, kwargs):
        state["calls"] += 1
        if state["calls"] == 1:
            return None  # the pipeline encoded the context for the first step already
        latents, timestep, _ = args
        conditional, unconditional = pipe.encode_prompt(PROMPT, None, True, 512, latents.device)
        conditional = transformer.prepare_context(conditional.to(latents.device, transformer.dtype))
        unconditional = transformer.prepare_context(unconditional.to(latents.device, transformer.dtype))
        return (latents, timestep, LightBagelContext.cat([conditional, unconditional])), kwargs

    handle = transformer.register_forward_pre_hook(reencode, with_kwargs=True)
    return handle, state


def add_timers(pipe) -> tuple[dict, list]:
    """Accumulate the wall time spent inside the VLM and the transformer, and count their calls."""
    totals = {"vlm_calls": 0, "vlm_s": 0.0, "dit_calls": 0, "dit_s": 0.0}
    handles = []

    def attach(module, name):
        start = {}

        def before(module, args):
            start["t"] = time.perf_counter()

        def after(module, args, output):
            totals[f"{name}_calls"] += 1
            totals[f"{name}_s"] += time.perf_counter() - start["t"]

        # The timer runs after any re-encoding pre-hook, so the DiT time leaves the re-encoding out.
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))

    attach(pipe.vlm, "vlm")
    attach(pipe.transformer, "dit")
    return totals, handles


def run(pipe, steps: int, size: int, repeats: int, reencode_state: dict | None = None) -> dict:
    """Return the figures of the median of `repeats` pipeline calls: wall time, VLM and DiT time and calls."""
    results = []
    for _ in range(repeats):
        if reencode_state is not None:
            reencode_state["calls"] = 0
        totals, handles = add_timers(pipe)
        start = time.perf_counter()
        pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **GUIDANCE,
        )
        totals["total_s"] = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        results.append(totals)
    results.sort(key=lambda item: item["total_s"])
    return results[len(results) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels; 512 is 256 latent tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    pipe = build_medium_pipeline()
    pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=1, output_type="latent")  # warm-up

    rows, measured = [], {}
    for steps in args.steps:
        cached = run(pipe, steps, args.size, args.repeats)
        handle, state = add_reencoding_hook(pipe)
        uncached = run(pipe, steps, args.size, args.repeats, reencode_state=state)
        handle.remove()
        measured[steps] = {"cached": cached, "uncached": uncached}
        for name, result in (("cached (as built)", cached), ("re-encoded every step", uncached)):
            other = result["total_s"] - result["dit_s"]
            rows.append([
                steps,
                name,
                result["vlm_calls"],
                f"{result['total_s'] * 1e3:.0f}",
                f"{result['vlm_s'] * 1e3:.0f}",
                f"{result['dit_s'] * 1e3 / steps:.0f}",
                f"{other * 1e3:.0f}",
            ])

    context_len = len(pipe.processor.tokenizer(pipe.format_vlm_prompt(PROMPT))["input_ids"])
    print(f"Machine: {machine_line()}")
    print(
        f"Config: medium random-weight pipeline (VLM 4 layers x 256, DiT 4 layers x 256 + 4 fusion blocks), "
        f"{args.size}x{args.size} image = {(args.size // 32) ** 2} latent tokens, prompt of {context_len} tokens, "
        f"text guidance on every step (batch 2), output_type='latent', median of {args.repeats} calls"
    )
    print_table(
        "Context cache: one VLM call per pipeline call vs one per step",
        ["steps", "variant", "VLM calls", "total (ms)", "in VLM (ms)", "DiT per step (ms)", "total - DiT (ms)"],
        rows,
    )
    return measured


if __name__ == "__main__":
    main()
