"""GPU benchmark: the full-size Qwen-Image DiT forward, qistudio against diffusers, one process, one card.

Random weights (real config, 20.4B parameters, bf16) are built once by diffusers' class on the GPU and shared by
assignment with our module (same tensor names), so both run on identical weights with one copy in memory.
Timings: CUDA events, median of N after warm-ups. Writes a Markdown table to $OUT/dit_forward.md (or stdout).

    python bench/dit_forward.py [--sizes 1328 1024] [--batches 1 2] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.models.packed_linears import set_packed_text_qkv  # noqa: E402
from qistudio.ops.ada_norm import set_fused_ada_norm  # noqa: E402
from qistudio.ops.attention import available_backends, set_attention_backend  # noqa: E402
from qistudio.ops.linear_gelu import set_fused_linear_gelu, set_quack_linear_gelu  # noqa: E402
from qistudio.ops.qk_norm_rope import set_fused_qk_norm_rope  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402
from qistudio.weights.build import empty_parameters  # noqa: E402

TEXT_LEN = 128
# Ablations (--without): each fused op's switch.
FUSED_SWITCHES = {"ada_norm": set_fused_ada_norm, "linear_gelu": set_fused_linear_gelu,
                  "quack_gelu": set_quack_linear_gelu, "qk_norm_rope": set_fused_qk_norm_rope,
                  "text_qkv": set_packed_text_qkv}


def cuda_time(fn, warmup=2, iters=5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, iters=10)
    return 2 * 8192**3 / t / 1e12


def dit_flops(tokens: int, text: int, batch: int, layers=60, dim=3072, mlp=12288) -> float:
    per_token_linear = 2 * (4 * dim * dim + 2 * dim * mlp)  # q, k, v, out + MLP in and out, per stream
    linear = per_token_linear * (tokens + text)
    attention = 2 * 2 * (tokens + text) ** 2 * dim  # QK^T and PV
    return batch * layers * (linear + attention)


def without_fused(name: str, fn):
    """fn run with one fused op switched off (its blocks recompile on first use: the switch is a guarded global)."""
    def run():
        FUSED_SWITCHES[name](False)
        try:
            return fn()
        finally:
            FUSED_SWITCHES[name](True)
    return run


def time_variants(variants, rounds: int, ref_out: torch.Tensor) -> list[tuple[str, float, float]]:
    """(name, median seconds, rel. error vs ref_out) per variant, timed round-robin: a power-limited card's clock
    drifts within seconds, and the ratios should not depend on which variant ran when."""
    errors = {name: ((fn().float() - ref_out).norm() / ref_out.norm()).item() for name, fn in variants}
    times = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, fn in variants:
            times[name].append(cuda_time(fn, iters=5 if rounds == 1 else 3))
    return [(name, statistics.median(times[name]), errors[name]) for name, _ in variants]


def graphed(fn):
    """fn (fixed inputs) captured as one CUDA graph after a warm-up; returns the replaying function."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1328, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true", help="also time regional torch.compile of both")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for our blocks (diffusers' keeps "
                        "the default), e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--fp8", action="store_true", help="then time ours with FP8 (W8A8) block linears")
    parser.add_argument("--no-bf16", action="store_true", help="time only diffusers' bf16 (the baseline) and ours "
                        "in FP8 (--fp8), for long max-autotune warm-ups")
    parser.add_argument("--cuda-graph", action="store_true", help="also ours with the forward captured as one CUDA "
                        "graph (launch gaps removed; an experiment, not yet a pipeline option)")
    parser.add_argument("--no-sdpa", action="store_true", help="bf16 rows: only the --attention backends (each "
                        "backend is a compilation of its own: long max-autotune warm-ups)")
    parser.add_argument("--attention", nargs="*", default=[], help="also time ours with these attention backends "
                        "forced (e.g. flash4), where installed")
    parser.add_argument("--without", nargs="*", default=[], choices=sorted(FUSED_SWITCHES),
                        help="also time ours (last attention backend) with each of these fused ops switched off")
    parser.add_argument("--rounds", type=int, default=1, help="time the variants round-robin this many times "
                        "(median of the rounds)")
    args = parser.parse_args()

    import diffusers
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.time()
    with torch.device("cuda"):
        ref = QwenImageTransformer2DModel(num_layers=60).eval()
    torch.set_default_dtype(torch.float32)
    print(f"built reference DiT in {time.time() - t0:.0f}s", flush=True)
    with empty_parameters():
        ours = QwenImageDiT(DiTConfig())
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)
    ours.eval().requires_grad_(False)
    ref.requires_grad_(False)

    # Errors are measured against diffusers' eager bf16 output (its own compiled output is 1.8% from it at 1328²
    # b=2: bf16 rounds differently along the fused path, and random weights amplify it through 60 blocks; against
    # a float32 run both are about 1% off, bench/fused_norm_check.py).
    cases = {}
    for size in args.sizes:
        h = w = size // 16
        for batch in args.batches:
            g = torch.Generator("cuda").manual_seed(size * 10 + batch)
            tokens = torch.randn(batch, h * w, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            text = torch.randn(batch, TEXT_LEN, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
            sigma = torch.full((batch,), 0.5, device="cuda")
            with torch.no_grad():
                eager_out = ref(hidden_states=tokens, encoder_hidden_states=text, timestep=sigma,
                                img_shapes=[[(1, h, w)]] * batch, return_dict=False)[0].float()
            cases[(size, batch)] = (tokens, text, sigma, eager_out)

    if args.compile:
        # Each (size, batch, bf16/FP8) case is its own graph: allow more than dynamo's default 8 per code object.
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.cache_size_limit = 64
        # Regional compile of the repeated block, diffusers' best configuration; ours the same way.
        ref.compile_repeated_blocks(fullgraph=True)
        compile_repeated_blocks(ours, mode=args.compile_mode)

    extra_attention = [name for name in args.attention if name in available_backends()]
    ceiling = matmul_ceiling()
    device_name = torch.cuda.get_device_name()
    rows = []
    for size in args.sizes:
        h = w = size // 16
        for batch in args.batches:
            tokens, text, sigma, ref_out = cases[(size, batch)]
            rotary = qwen_rotary([ImageGrid(0, h, w)], TEXT_LEN, device="cuda")
            flops = dit_flops(h * w, TEXT_LEN, batch)

            def run_ref():
                with torch.no_grad():
                    return ref(hidden_states=tokens, encoder_hidden_states=text, timestep=sigma,
                               img_shapes=[[(1, h, w)]] * batch, return_dict=False)[0]

            def run_ours():
                with torch.no_grad():
                    return ours(tokens, text, sigma, rotary)

            def ours_with(backend):
                def run():
                    set_attention_backend(backend)
                    return run_ours()
                return run

            ref_mode = "regional compile" if args.compile else "eager (mask=None)"
            mode = ("regional compile" + (f" ({args.compile_mode})" if args.compile_mode else "")
                    if args.compile else "eager")
            variants = [(f"diffusers {ref_mode}", run_ref)]
            if not args.no_bf16:
                # Each row names its attention kernel: the automatic choice differs by what is installed.
                variants += [(f"qistudio {mode}, {name} attention", ours_with(name))
                             for name in ([] if args.no_sdpa else ["sdpa"]) + [n for n in extra_attention
                                                                               if n != "sdpa"]]
            for fused_op in [] if args.no_bf16 else args.without:
                backend = extra_attention[-1] if extra_attention else "sdpa"
                variants.append((f"qistudio {mode}, {backend} attention, without fused {fused_op}",
                                 without_fused(fused_op, ours_with(backend))))
            if args.cuda_graph and not args.no_bf16:
                backend = extra_attention[-1] if extra_attention else "sdpa"
                variants.append((f"qistudio {mode}, {backend} attention, the whole forward as one CUDA graph",
                                 graphed(ours_with(backend))))
            for name, t, err in time_variants(variants, args.rounds, ref_out):
                rows.append((f"{size}² b={batch}", name, t, flops / t / 1e12, err))
                print(rows[-1], flush=True)
            set_attention_backend(None)
    if args.fp8:
        from qistudio.memory.fp8_linear import quantize_linears, set_fp8_compute

        quantize_linears(ours)  # our block linears get FP8 copies; diffusers' model keeps the bf16 weights
        set_fp8_compute(ours, True)
        set_attention_backend(None)
        for size in args.sizes:
            h = w = size // 16
            for batch in args.batches:
                tokens, text, sigma, ref_out = cases[(size, batch)]
                rotary = qwen_rotary([ImageGrid(0, h, w)], TEXT_LEN, device="cuda")

                def run_ref():
                    with torch.no_grad():
                        return ref(hidden_states=tokens, encoder_hidden_states=text, timestep=sigma,
                                   img_shapes=[[(1, h, w)]] * batch, return_dict=False)[0]

                def fp8_with(backend, fast):
                    def run():
                        set_attention_backend(backend)
                        set_fp8_compute(ours, True, fast_accumulation=fast)
                        with torch.no_grad():
                            return ours(tokens, text, sigma, rotary)
                    return run

                fp8_backends = ["sdpa"] + [n for n in extra_attention if n != "sdpa"]
                fp8_backends += ["cudnn_fp8"] if "cudnn_fp8" in available_backends() else []
                # The last backend (the fastest where installed) also with the GEMMs' float32 accumulation. The
                # baseline is timed again among these rows, minutes after the bf16 rows.
                variants = [(f"diffusers {ref_mode}, timed again beside the FP8 rows", run_ref)]
                for backend, fast in [(name, True) for name in fp8_backends] + [(fp8_backends[-1], False)]:
                    label = {"cudnn_fp8": " + cuDNN FP8 attention"}.get(backend, f" + {backend} attention")
                    label += "" if fast else ", float32 accumulation (not fast)"
                    variants.append((f"qistudio {mode}, FP8 W8A8 block linears{label}", fp8_with(backend, fast)))
                for name, t, err in time_variants(variants, args.rounds, ref_out):
                    rows.append((f"{size}² b={batch}", name, t, dit_flops(h * w, TEXT_LEN, batch) / t / 1e12, err))
                    print(rows[-1], flush=True)
                set_fp8_compute(ours, True, fast_accumulation=True)
                set_attention_backend(None)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    lines = [
        f"Card: {device_name}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
        f"date {time.strftime('%Y-%m-%d')}; bf16 matmul ceiling measured {ceiling:.0f} TFLOP/s; text {TEXT_LEN} tokens; "
        f"peak {peak:.1f} GiB (shared weights)",
        "",
        "| case | implementation | forward | x diffusers | TFLOP/s | % of ceiling "
        "| rel. err vs diffusers eager (bf16) |",
        "|---|---|---|---|---|---|---|",
    ]
    baseline = {}  # each row against the latest diffusers timing of its case
    for case, name, t, tf, err in rows:
        if name.startswith("diffusers"):
            baseline[case] = t
        lines.append(f"| {case} | {name} | {t:.3f} s | {baseline[case] / t:.2f} | {tf:.0f} | "
                     f"{100 * tf / ceiling:.0f}% | {err:.2e} |")
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out, "dit_forward.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
