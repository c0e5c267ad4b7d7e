"""GPU benchmark: a whole image (text encoding + N steps with guidance + VAE decode) through qistudio's pipeline and
diffusers' QwenImagePipeline, one process, one card, the same full-size random weights shared by both.

Both DiTs run regional torch.compile of their repeated block (diffusers' best configuration). Ours batches the two
guidance branches; diffusers' pipeline runs them one after the other. Also ours with FP8 (W8A8) block linears.
Needs bench/.tokenizer and bench/.shapes (see bench/pipeline_low_vram.py).

    python bench/end_to_end.py [--steps 40] [--size 1328]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_low_vram import PROMPT  # noqa: E402
from qistudio.ops.packing import patchify  # noqa: E402

NEGATIVE = "blurry, low quality"


def wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def build_both():
    """diffusers' components built on the GPU in bf16; ours take the same tensors (no second copy)."""
    import json

    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from qistudio.components import Components
    from qistudio.demo import SCHEDULER
    from qistudio.models.dit import DiTConfig, QwenImageDiT
    from qistudio.models.text_encoder import QwenImageTextEncoder, text_encoder_config_from_shapes
    from qistudio.models.vae import QwenImageVAE, VAEConfig
    from qistudio.pipeline import QwenImagePipeline as OurPipeline
    from qistudio.weights.build import empty_parameters
    from qistudio.weights.formats import detect_layout

    root = Path(__file__).resolve().parents[1]
    listing = json.loads((root / "bench/.shapes/qwen_image_text_encoder.json").read_text())["tensors"]
    layout = detect_layout(listing)
    config = text_encoder_config_from_shapes({layout.key_map(k): tuple(v) for k, v in listing.items()})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = QwenImageTransformer2DModel(num_layers=60).eval().requires_grad_(False)
        vae = AutoencoderKLQwenImage().eval().requires_grad_(False)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "bench/.tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    ref = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            transformer=transformer)
    ref.set_progress_bar_config(disable=True)
    with empty_parameters():
        dit = QwenImageDiT(DiTConfig())
        our_vae = QwenImageVAE(VAEConfig())
    dit.load_state_dict(transformer.state_dict(), assign=True, strict=True)
    missing = our_vae.load_state_dict(vae.state_dict(), assign=True, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    our_vae.to("cuda")
    with torch.device("meta"):
        our_text = QwenImageTextEncoder(config)
    our_text.model = text_encoder.model  # the same module: one copy of the 8 B parameters
    components = Components(dit=dit.eval().requires_grad_(False), vae=our_vae.eval(), text_encoder=our_text.eval(),
                            tokenizer=tokenizer)
    return OurPipeline(components, "cuda", torch.bfloat16), ref


def median_time(fn, repeats: int = 5) -> float:
    fn()
    return sorted(wall(fn) for _ in range(repeats))[repeats // 2]


def component_rows(ours, ref, size: int) -> list[tuple[str, float, float]]:
    """Text encoding (prompt and negative prompt) and the VAE decode, each library on its own."""
    from qistudio.pipeline import encode_text
    from qistudio.request import build_request

    request = build_request(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, height=size, width=size)

    def ours_text():
        with torch.no_grad():
            encode_text(ours.components, request, "cuda", torch.bfloat16)

    def ref_text():
        with torch.no_grad():
            ref.encode_prompt(prompt=PROMPT, device="cuda")
            ref.encode_prompt(prompt=NEGATIVE, device="cuda")

    latents = torch.randn(1, 16, size // 8, size // 8, device="cuda", dtype=torch.bfloat16)

    def ours_decode():
        with torch.no_grad():
            ours.vae.decode(latents)

    def ref_decode():
        with torch.no_grad():
            ref.vae.decode(latents[:, :, None], return_dict=False)

    rows = [("text encoding (prompt + negative)", median_time(ref_text), median_time(ours_text)),
            (f"VAE decode {size}x{size}", median_time(ref_decode), median_time(ours_decode))]
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=1328)
    parser.add_argument("--compile-mode", default=None, help="our pipe.compile(mode=...), e.g. "
                        "max-autotune-no-cudagraphs (diffusers' transformer keeps its default regional compile)")
    parser.add_argument("--no-fp8", action="store_true", help="bf16 rows only")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    ours, ref = build_both()
    size, steps = args.size, args.steps
    parts = component_rows(ours, ref, size)
    ref.transformer.compile_repeated_blocks(fullgraph=True)
    ours.compile(mode=args.compile_mode)
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def run_ours(n, output_type="pil"):
        return ours(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, num_inference_steps=n, height=size, width=size,
                    noise=noise, progress_bar_cmd=lambda x: x, output_type=output_type)

    def run_ref(n, output_type="pil"):
        with torch.no_grad():
            return ref(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=n,
                       height=size, width=size, latents=patchify(noise.cuda()), output_type=output_type)

    def final_latents(fn):
        """The latents after all steps, before the VAE, as (1, 16, H/8, W/8) float32."""
        latents = fn(steps, output_type="latent")
        latents = latents.images if hasattr(latents, "images") else latents
        if latents.dim() == 3:  # diffusers returns them packed (1, tokens, 64)
            latents = ref._unpack_latents(latents, size, size, ref.vae_scale_factor)[:, :, 0]
        return latents.float().reshape(1, 16, size // 8, size // 8)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    from qistudio.ops.attention import available_backends, resolve_automatic_backend, set_fp8_attention

    compiled = "compiled" + (f" ({args.compile_mode})" if args.compile_mode else "")
    attention_name = {"flash4": "FlashAttention 4", "sdpa": "SDPA (cuDNN)"}[resolve_automatic_backend()]
    rows = []
    for name, fn in [("diffusers QwenImagePipeline, compiled transformer", run_ref),
                     (f"qistudio, {compiled} DiT blocks, guidance batched, {attention_name} attention", run_ours)]:
        fn(2)  # compile and warm up
        rows.append((name, wall(lambda: fn(steps))))
        print(rows[-1], flush=True)
    # Final-latent agreement after the whole run: diffusers' bf16 is the reference; the bf16-vs-bf16 line shows
    # how far 40 steps of bf16 rounding alone carry two correct implementations apart.
    ref_latents = final_latents(run_ref)
    bf16_latents = final_latents(run_ours)
    errors = [("qistudio bf16 vs diffusers bf16", rel(bf16_latents, ref_latents))]
    if not args.no_fp8:
        # diffusers is done: drop its references to the shared bf16 block weights, so that they go when ours are
        # replaced by FP8 copies (on an 80 GB card the text encoder, both weight sets and activations do not fit).
        ref.transformer.to("meta")
        ours.enable_fp8_computation(attention=False)
        torch.cuda.empty_cache()
        run_ours(2)
        rows.append((f"qistudio, {compiled}, FP8 W8A8 block linears + {attention_name} attention",
                     wall(lambda: run_ours(steps))))
        print(rows[-1], flush=True)
        errors.append(("qistudio FP8 W8A8 vs qistudio bf16", rel(final_latents(run_ours), bf16_latents)))
    if not args.no_fp8 and "cudnn_fp8" in available_backends():
        set_fp8_attention(ours.dit, True)
        run_ours(2)
        rows.append((f"qistudio, {compiled}, FP8 W8A8 block linears + FP8 attention (cuDNN)",
                     wall(lambda: run_ours(steps))))
        print(rows[-1], flush=True)
        errors.append(("qistudio FP8 W8A8 + FP8 attention vs qistudio bf16", rel(final_latents(run_ours), bf16_latents)))
    print(errors, flush=True)
    base = rows[0][1]
    lines = [f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
             f"{size}x{size}, {steps} steps, cfg 4 with a negative prompt, text encoding + steps + VAE decode, "
             "full-size random weights shared by both libraries", "",
             "| pipeline | image | x diffusers |", "|---|---|---|"]
    lines += [f"| {name} | {t:.2f} s | {t / base:.2f} |" for name, t in rows]
    lines += ["", f"Final latents after {steps} steps (relative L2):", "", "| comparison | rel. L2 |", "|---|---|"]
    lines += [f"| {name} | {e:.2e} |" for name, e in errors]
    lines += ["", "The parts, eager, same run (median of 5 after a warm-up):", "",
              "| part | diffusers | qistudio | x diffusers |", "|---|---|---|---|"]
    lines += [f"| {name} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {b / a:.2f} |" for name, a, b in parts]
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "end_to_end.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
