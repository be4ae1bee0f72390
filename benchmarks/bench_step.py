"""One denoising step of the LightBagel transformer against a bare diffusers WanTransformer3DModel.

Both models get the same DiT config, latent shape and context length. LightBagel also runs the generation half of
one fusion block after every DiT block, reading cached understanding keys and values, so its extra cost should
follow its extra FLOPs. The script prints both measured times, both FLOP counts (torch's FlopCounterMode and the
analytic formula below) and whether the time ratio is within 10% of the FLOP ratio.

    python benchmarks/bench_step.py [--layers 6 --heads 8 --head-dim 64 --ffn 2048 --tokens 512 --context 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count_flops, machine_line, print_table, set_threads, time_interleaved  # noqa: E402

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers_lightbagel import LightBagelContext, LightBagelTransformer2DModel  # noqa: E402
from diffusers_lightbagel.tiny import randomize_fusion_outputs  # noqa: E402


def analytic_flops(layers: int, dim: int, ffn: int, tokens: int, context: int, text_dim: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per multiply-add) of the matmuls and attention of one forward pass, by part.

    Norms, modulation, rotary embedding, the timestep MLP and the patch embedding are left out: they are small
    beside the blocks at these sizes.
    """
    self_attention = 2 * tokens * 4 * dim * dim + 2 * 2 * tokens * tokens * dim
    cross_attention = 2 * tokens * 2 * dim * dim + 2 * 2 * tokens * context * dim + 2 * context * 2 * text_dim * dim
    feed_forward = 2 * tokens * 2 * dim * ffn
    # Generation half of a fusion block: q, k, v, out projections, then attention over context + generation keys.
    fusion = 2 * tokens * 4 * dim * dim + 2 * 2 * tokens * (context + tokens) * dim
    dit = layers * (self_attention + cross_attention + feed_forward)
    return {"dit": dit, "fusion": layers * fusion, "lightbagel": dit + layers * fusion}


def build_models(args):
    dim = args.heads * args.head_dim
    common = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=args.channels,
        out_channels=args.channels,
        text_dim=dim,
        freq_dim=256,
        ffn_dim=args.ffn,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**common).eval()
    lightbagel = LightBagelTransformer2DModel(**common, vlm_hidden_size=dim, vlm_num_layers=args.layers).eval()
    # The DiT weights are shared so both models compute the same DiT; the fusion outputs are made non-zero.
    missing, unexpected = lightbagel.load_state_dict(wan.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("fusion_blocks.") for name in missing)
    randomize_fusion_outputs(lightbagel, std=0.02)
    return wan, lightbagel


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512, help="latent tokens after the 2x2 patch; a multiple of 16")
    parser.add_argument("--context", type=int, default=128, help="understanding tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.tokens % 16:
        parser.error(f"--tokens must be a multiple of 16 (a 16-token-high latent grid); got {args.tokens}.")

    dim = args.heads * args.head_dim
    wan, lightbagel = build_models(args)
    generator = torch.Generator().manual_seed(0)
    # (batch, channels, frames, height, width): 16 patch rows by tokens / 16 patch columns.
    latents = torch.randn(1, args.channels, 1, 32, args.tokens // 8, generator=generator)
    timestep = torch.tensor([500.0])
    text = torch.randn(1, args.context, dim, generator=generator)
    head_shape = (1, args.context, args.heads, args.head_dim)
    context = LightBagelContext(
        encoder_hidden_states=text,
        attention_mask=torch.ones(1, args.context, dtype=torch.bool),
        keys=tuple(torch.randn(head_shape, generator=generator) for _ in range(args.layers)),
        values=tuple(torch.randn(head_shape, generator=generator) for _ in range(args.layers)),
    )
    context = lightbagel.prepare_context(context)

    def run_wan():
        with torch.no_grad():
            wan(latents, timestep, text, return_dict=False)

    def run_lightbagel():
        with torch.no_grad():
            lightbagel(latents, timestep, context, return_dict=False)

    # The LightBagel context carries the text projection (two linear layers), done once per prompt; Wan runs it at
    # every step, so Wan's counted FLOPs include it and LightBagel's do not.
    counted = {"wan": count_flops(run_wan), "lightbagel": count_flops(run_lightbagel)}
    analytic = analytic_flops(args.layers, dim, args.ffn, args.tokens, args.context, dim)
    times = time_interleaved({"wan": run_wan, "lightbagel": run_lightbagel}, repeats=args.repeats)

    time_ratio = times["lightbagel"] / times["wan"]
    counted_ratio = counted["lightbagel"] / counted["wan"]
    analytic_ratio = analytic["lightbagel"] / analytic["dit"]
    target_met = abs(time_ratio / counted_ratio - 1) <= 0.10

    config = (
        f"{args.layers} layers, {args.heads} heads x {args.head_dim} (width {dim}), FFN {args.ffn}, "
        f"{args.tokens} latent tokens, {args.context} context tokens, batch 1, float32"
    )
    print(f"Machine: {machine_line()}")
    print(f"Config: {config}")
    print_table(
        "Denoising step: LightBagel transformer vs bare WanTransformer3DModel",
        ["model", "median step (ms)", "GFLOPs (FlopCounterMode)", "GFLOPs (analytic)"],
        [
            ["WanTransformer3DModel", f"{times['wan'] * 1e3:.1f}", f"{counted['wan'] / 1e9:.2f}",
             f"{analytic['dit'] / 1e9:.2f}"],
            ["LightBagelTransformer2DModel", f"{times['lightbagel'] * 1e3:.1f}", f"{counted['lightbagel'] / 1e9:.2f}",
             f"{analytic['lightbagel'] / 1e9:.2f}"],
            ["ratio LightBagel / Wan", f"{time_ratio:.3f}", f"{counted_ratio:.3f}", f"{analytic_ratio:.3f}"],
        ],
    )
    verdict = "met" if target_met else "NOT met"
    print(
        f"\nTarget (time ratio within 10% of the FlopCounterMode ratio): {verdict} "
        f"({time_ratio:.3f} vs {counted_ratio:.3f}, {100 * (time_ratio / counted_ratio - 1):+.1f}%)."
    )
    return {"times": times, "flops": counted, "analytic": analytic, "target_met": target_met}


if __name__ == "__main__":
    main()
