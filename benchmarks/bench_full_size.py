"""The full-size LightBagel configuration, built on the meta device: parameter counts and a memory estimate.

Components: Qwen2.5-VL-7B (transformers' Qwen2_5_VLConfig with the public 7B fields), the LightBagel transformer
with the Wan2.2-TI2V-5B DiT shape (30 layers, 24 heads x 128, FFN 14336, 48 latent channels) and a fusion block per
DiT block, and the Wan2.2 VAE (AutoencoderKLWan, base_dim 160, decoder_base_dim 256, z_dim 48). Nothing is
allocated: the weights sit on the meta device.

The activation figures come from running the DiT and the VAE decoder forward on meta tensors while a
TorchDispatchMode adds up the bytes of the tensors alive at once (benchmarks/_common.py). Python frees tensors in
the same order on the meta device as on a real one, so the trace follows the real liveness; kernels' internal
workspace is not seen, and the attention kernel chosen on an accelerator may differ from the meta one. The script
checks the tracer against a real CPU run of the tiny VAE. The VLM's activations are estimated from its shapes,
since its forward reads tensor values (position ids) that meta tensors do not have. All totals are ESTIMATES.
No accelerator was available, so no full-size step was timed.

    python benchmarks/bench_full_size.py [--context 256 --size 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakTensorMemory, machine_line, print_table  # noqa: E402

from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusers_lightbagel import LightBagelContext, LightBagelTransformer2DModel  # noqa: E402
from diffusers_lightbagel.tiny import build_tiny_vae  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402


GIB = 2**30
VLM_TEXT = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
VLM_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
TRANSFORMER = dict(
    num_layers=30,
    num_attention_heads=24,
    attention_head_dim=128,
    ffn_dim=14336,
    in_channels=48,
    out_channels=48,
    text_dim=3584,
    vlm_hidden_size=3584,
    vlm_num_layers=28,
)
VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
)


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def build_on_meta():
    with torch.device("meta"):
        vlm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=VLM_TEXT, vision_config=VLM_VISION))
        transformer = LightBagelTransformer2DModel(**TRANSFORMER)
        vae = AutoencoderKLWan(**VAE)
    return vlm, transformer, vae


def parameter_rows(vlm, transformer, vae) -> tuple[list[list[str]], dict[str, int]]:
    fusion = count(transformer.fusion_blocks)
    understanding = sum(count(block.understanding) for block in transformer.fusion_blocks)
    counts = {
        "VLM vision encoder (ViT)": count(vlm.model.visual),
        "VLM language model (28 layers + embeddings)": count(vlm.model.language_model),
        "VLM lm_head": count(vlm.lm_head),
        "DiT (Wan2.2-5B shape, text projection from 3584)": count(transformer) - fusion,
        "fusion blocks, understanding halves (run once per prompt)": understanding,
        "fusion blocks, generation halves (run every step)": fusion - understanding,
        "VAE (Wan2.2)": count(vae),
    }
    total = sum(counts.values())
    rows = [[name, f"{value / 1e9:.3f}", f"{100 * value / total:.1f}%"] for name, value in counts.items()]
    rows.append(["total", f"{total / 1e9:.3f}", "100%"])
    counts["fusion"] = fusion
    counts["transformer"] = count(transformer)
    counts["vlm"] = count(vlm)
    counts["total"] = total
    return rows, counts


def trace_peak(function, flash_attention: bool = False) -> int:
    """Trace `function` on meta tensors and return its activation peak in bytes.

    On the meta device scaled_dot_product_attention always takes the math path, which stores the full
    (batch, heads, queries, keys) score matrix. `flash_attention=True` replaces it during the trace by an op that only
    allocates the output, as flash and memory-efficient kernels do.
    """

    def output_only_attention(query, key, value, *args, **kwargs):
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    with contextlib.ExitStack() as stack:
        if flash_attention:
            stack.enter_context(
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", output_only_attention)
            )
        stack.enter_context(torch.no_grad())
        tracker = stack.enter_context(PeakTensorMemory(include_meta=True))
        function()
    return tracker.peak_bytes


def check_tracer_on_tiny_vae() -> tuple[int, int]:
    """Return the peak of the tiny VAE decode traced on CPU tensors and on meta tensors; they should agree."""
    vae = build_tiny_vae()
    latents = torch.randn(1, 16, 1, 8, 8)
    real = trace_peak(lambda: vae.decode(latents))
    meta_vae = vae.to("meta")
    meta = trace_peak(lambda: meta_vae.decode(latents.to("meta")))
    return real, meta


def dit_peak(transformer, batch: int, context_len: int, latent_side: int, dtype) -> int:
    kwargs = dict(device="meta", dtype=dtype)
    heads, head_dim = TRANSFORMER["num_attention_heads"], TRANSFORMER["attention_head_dim"]
    context = LightBagelContext(
        encoder_hidden_states=torch.empty(batch, context_len, TRANSFORMER["vlm_hidden_size"], **kwargs),
        # An unpadded mask on the CPU: the transformer reads its values, which meta tensors do not have.
        attention_mask=torch.ones(batch, context_len, dtype=torch.bool),
        keys=tuple(torch.empty(batch, context_len, heads, head_dim, **kwargs) for _ in range(TRANSFORMER["num_layers"])),
        values=tuple(
            torch.empty(batch, context_len, heads, head_dim, **kwargs) for _ in range(TRANSFORMER["num_layers"])
        ),
    )
    context = transformer.prepare_context(context)
    latents = torch.empty(batch, TRANSFORMER["in_channels"], 1, latent_side, latent_side, **kwargs)
    timestep = torch.full((batch,), 500.0, device="meta")
    return {
        "math": trace_peak(lambda: transformer(latents, timestep, context)),
        "flash": trace_peak(lambda: transformer(latents, timestep, context), flash_attention=True),
    }


def vlm_activation_estimate(batch: int, context_len: int, bytes_per_value: int) -> int:
    """Estimate the VLM forward's activation peak from its shapes: the residual stream, one layer's MLP (gate, up
    and their product alive at once) and one layer's attention output, plus the fusion keys and values it returns.
    """
    tokens = batch * context_len
    hidden, intermediate = VLM_TEXT["hidden_size"], VLM_TEXT["intermediate_size"]
    per_layer = tokens * (3 * intermediate + 4 * hidden) * bytes_per_value
    return per_layer + context_cache_bytes(batch, context_len, bytes_per_value)


def context_cache_bytes(batch: int, context_len: int, bytes_per_value: int) -> int:
    """Bytes of the cached understanding context: keys and values for every fusion block, plus the last hidden
    states and their text projection."""
    inner = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    keys_values = 2 * TRANSFORMER["num_layers"] * batch * context_len * inner
    hidden = batch * context_len * (TRANSFORMER["vlm_hidden_size"] + inner)
    return (keys_values + hidden) * bytes_per_value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--context", type=int, default=256, help="assumed understanding tokens per branch")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error(f"--size must be a multiple of 32; got {args.size}.")

    vlm, transformer, vae = build_on_meta()
    diffusers_logging.set_verbosity_error()  # `.to(bfloat16)` on meta modules warns about fp32 modules each time
    rows, counts = parameter_rows(vlm, transformer, vae)
    print(f"Machine: {machine_line()}")
    print("No accelerator was available: nothing below was timed at full size.")
    print_table("Full-size parameter counts (meta device)", ["component", "parameters (B)", "share"], rows)
    print(
        f"\nFusion blocks: {counts['fusion'] / 1e9:.3f} B parameters, "
        f"{100 * counts['fusion'] / counts['transformer']:.1f}% of the LightBagel transformer, "
        f"{100 * counts['fusion'] / counts['total']:.1f}% of the whole pipeline."
    )

    weight_rows = []
    for label, key in (("VLM", "vlm"), ("transformer", "transformer")):
        weight_rows.append([label, *(f"{counts[key] * size / GIB:.2f}" for size in (4, 2, 1))])
    vae_params = count(vae)
    weight_rows.append(["VAE", *(f"{vae_params * size / GIB:.2f}" for size in (4, 2, 1))])
    weight_rows.append(["total", *(f"{counts['total'] * size / GIB:.2f}" for size in (4, 2, 1))])
    print_table(
        "Weight memory (GiB) by storage dtype",
        ["component", "float32", "bfloat16", "float8 (layerwise casting storage)"],
        weight_rows,
    )

    real, meta = check_tracer_on_tiny_vae()
    print(f"\nTracer check, tiny VAE decode peak: CPU run {real / 2**20:.2f} MiB, meta trace {meta / 2**20:.2f} MiB.")

    latent_side = args.size // VAE["scale_factor_spatial"]
    activation_rows, phases = [], {}
    for task, batch in (("text-to-image", 2), ("edit", 3)):
        # Editing adds the reference image's ViT tokens (one per 28x28 pixels) to the context, and its clean
        # latents as a second frame of DiT tokens.
        context_len = args.context + (args.size // 28) ** 2 if task == "edit" else args.context
        frames = 2 if task == "edit" else 1
        dit = dit_peak(transformer.to(torch.bfloat16), batch, context_len, latent_side, torch.bfloat16) if frames == 1 \
            else dit_peak_edit(transformer, batch, context_len, latent_side)
        cache = context_cache_bytes(batch, context_len, 2)
        vlm_peak = vlm_activation_estimate(batch, context_len, 2)
        phases[task] = {"vlm": vlm_peak, "dit": dit["flash"] + cache, "context": cache}
        activation_rows.append([task, batch, context_len, f"{vlm_peak / GIB:.2f}", f"{cache / GIB:.2f}",
                                f"{dit['flash'] / GIB:.2f}", f"{dit['math'] / GIB:.2f}"])
    decode = {}
    for dtype, label in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        meta_vae = vae.to(dtype)
        latents = torch.empty(1, VAE["z_dim"], 1, latent_side, latent_side, device="meta", dtype=dtype)
        decode[label] = trace_peak(lambda: meta_vae.decode(latents))
    print_table(
        f"Activation peaks at {args.size}x{args.size} (ESTIMATES; bfloat16 VLM and DiT)",
        ["task", "guidance branches (batch)", "context tokens per branch", "VLM forward (shape estimate, GiB)",
         "context cache (GiB)", "DiT step, flash attention (meta trace, GiB)",
         "DiT step, math attention (meta trace, GiB)"],
        activation_rows,
    )
    print(
        f"\nVAE decode of one {args.size}x{args.size} image (meta trace): {decode['bfloat16'] / GIB:.2f} GiB in "
        f"bfloat16, {decode['float32'] / GIB:.2f} GiB in float32."
    )

    weights_bf16 = (counts["vlm"] + counts["transformer"]) * 2
    vae_fp32 = vae_params * 4
    total_rows = []
    for task, phase in phases.items():
        peak_phase = max(phase["vlm"], phase["dit"], decode["float32"] + phase["context"])
        resident = weights_bf16 + vae_fp32 + peak_phase
        # With model offload only the active component's weights sit on the accelerator.
        offloaded = max(
            counts["vlm"] * 2 + phase["vlm"],
            counts["transformer"] * 2 + phase["dit"],
            vae_fp32 + decode["float32"],
        )
        total_rows.append([task, f"{resident / GIB:.1f}", f"{offloaded / GIB:.1f}"])
    print_table(
        f"Accelerator memory for one {args.size}x{args.size} image (ESTIMATE: weights bfloat16, VAE float32, "
        "flash attention)",
        ["task", "all components resident (GiB)", "enable_model_cpu_offload (GiB)"],
        total_rows,
    )
    return {"counts": counts, "phases": phases, "decode": decode}


def dit_peak_edit(transformer, batch: int, context_len: int, latent_side: int) -> int:
    """Trace a DiT step with the reference image's clean latents as a second frame."""
    kwargs = dict(device="meta", dtype=torch.bfloat16)
    heads, head_dim = TRANSFORMER["num_attention_heads"], TRANSFORMER["attention_head_dim"]
    layers = TRANSFORMER["num_layers"]
    context = LightBagelContext(
        encoder_hidden_states=torch.empty(batch, context_len, TRANSFORMER["vlm_hidden_size"], **kwargs),
        attention_mask=torch.ones(batch, context_len, dtype=torch.bool),
        keys=tuple(torch.empty(batch, context_len, heads, head_dim, **kwargs) for _ in range(layers)),
        values=tuple(torch.empty(batch, context_len, heads, head_dim, **kwargs) for _ in range(layers)),
    )
    transformer = transformer.to(torch.bfloat16)
    context = transformer.prepare_context(context)
    latents = torch.empty(batch, TRANSFORMER["in_channels"], 2, latent_side, latent_side, **kwargs)
    tokens_per_frame = (latent_side // 2) ** 2
    timestep = torch.full((batch, 2 * tokens_per_frame), 500.0, device="meta")
    return {
        "math": trace_peak(lambda: transformer(latents, timestep, context)),
        "flash": trace_peak(lambda: transformer(latents, timestep, context), flash_attention=True),
    }


if __name__ == "__main__":
    main()
