"""Where a whole compiled DiT forward's wall time goes: GPU kernel time against wall time, and the host's share.

Full-size random weights, 1328x1328, guidance batched (batch 2). If the host takes about as long to issue a forward
as the GPU takes to run it, the gaps between kernels are the host's doing.

    python bench/profile_forward.py [--fp8] [--attention flash4] [--text-len 23] [--text-lengths 23 41]

Kernels are grouped (GEMM, attention, Triton element-wise, other) per block, and the SM clock and power drawn while
forwards run back to back are sampled (nvidia-smi), to tell a slow kernel from a card that clocks down under load.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import TEXT_LEN  # noqa: E402
from bench.timing import measure  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp8", action="store_true", help="W8A8 linears and FP8 attention")
    parser.add_argument("--attention", default=None, help="force an attention backend (flash4, sdpa, ...)")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--text-len", type=int, default=TEXT_LEN)
    parser.add_argument("--text-lengths", type=int, nargs="*", default=None,
                        help="valid text tokens per row (padded batch, as guidance with a negative prompt)")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--gaps", action="store_true", help="also the idle time between kernels, by kernel pair")
    parser.add_argument("--ada-launch", type=int, nargs="+", default=None, metavar="N",
                        help="ROWS WARPS [CHUNK]: tokens per program, num_warps (0: the default) and columns per "
                        "pass (0: the whole-row kernels) of the adaptive norm kernels")
    parser.add_argument("--qk-launch", type=int, nargs=2, default=None, metavar=("ROWS", "WARPS"),
                        help="heads per program and num_warps of the q/k norm+RoPE kernel")
    args = parser.parse_args()
    # Launch settings are traced into the compiled graph, which inductor's on-disk cache does not key on: run
    # each setting with its own TORCHINDUCTOR_CACHE_DIR.
    if args.ada_launch:
        from qistudio.ops import ada_norm

        rows, warps, *chunk = args.ada_launch
        ada_norm.ADA_LAUNCH.update(ROWS=rows, num_warps=warps or None, CHUNK=chunk[0] if chunk else 0)
    if args.qk_launch:
        from qistudio.ops import qk_norm_rope

        qk_norm_rope.QK_LAUNCH.update(ROWS=args.qk_launch[0], num_warps=args.qk_launch[1])
    if args.attention:
        from qistudio.ops.attention import set_attention_backend

        set_attention_backend(args.attention)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        dit = QwenImageDiT(DiTConfig()).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    if args.fp8:
        from qistudio.memory.fp8_linear import quantize_linears, set_fp8_compute
        from qistudio.ops.attention import set_fp8_attention

        quantize_linears(dit)
        set_fp8_compute(dit, True)
        set_fp8_attention(dit, True)
    compile_repeated_blocks(dit, mode=args.mode)
    h = w = 1328 // 16
    text_len = max(args.text_lengths) if args.text_lengths else args.text_len
    tokens = torch.randn(2, h * w, 64, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, text_len, 3584, device="cuda", dtype=torch.bfloat16)
    sigma = torch.full((2,), 0.5, device="cuda")
    rotary = qwen_rotary([ImageGrid(0, h, w)], text_len, device="cuda")

    def forward():
        with torch.no_grad():
            return dit(tokens, text, sigma, rotary, text_lengths=args.text_lengths)

    wall = measure(forward, warmup=2).median
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                                "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
    for _ in range(10):
        forward()
    torch.cuda.synchronize()
    sampler.terminate()
    samples = [[float(x) for x in line.split(",")] for line in sampler.communicate()[0].splitlines()
               if re.fullmatch(r"[\d., ]+", line)]
    if samples:
        mid = samples[len(samples) // 4:]  # past the ramp-up
        print(f"under load: SM clock {min(s[0] for s in mid):.0f}-{max(s[0] for s in mid):.0f} MHz "
              f"(max {mid[0][1]:.0f}), power {max(s[2] for s in mid):.0f} W, {max(s[3] for s in mid):.0f} C")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward()
    issue = time.perf_counter() - t0  # host time to issue one forward (no synchronisation inside)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu = sum(e.device_time_total for e in kernels) / 1e6
    print(f"forward {wall:.3f} s, kernels {gpu:.3f} s, gaps {wall - gpu:.3f} s, host issue time {issue:.3f} s")
    groups = defaultdict(float)
    for e in kernels:
        groups[kernel_group(e.key)] += e.device_time_total / 1000
    blocks = len(dit.transformer_blocks)
    print("per block: " + ", ".join(f"{name} {ms / blocks:.3f} ms" for name, ms in sorted(groups.items())))
    if args.gaps:
        print_gaps(prof)
    kernels.sort(key=lambda e: -e.device_time_total)
    for e in kernels[:args.rows]:
        print(f"{e.device_time_total / 1000:8.2f} ms x{e.count:<4d} {e.device_time_total / e.count:8.1f} us "
              f"[{kernel_group(e.key)}] {e.key[:110]}")


def print_gaps(prof, top: int = 15) -> None:
    """The idle time between consecutive kernels of the profiled forward, summed by (kernel before, kernel after)."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    pairs, total = defaultdict(lambda: [0.0, 0]), 0.0
    for before, after in zip(kernels, kernels[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 0:
            key = (before["name"][:50], after["name"][:50])
            pairs[key][0] += gap
            pairs[key][1] += 1
            total += gap
    print(f"idle between kernels: {total / 1000:.2f} ms over {len(kernels)} kernels; largest by pair:")
    for (before, after), (gap, count) in sorted(pairs.items(), key=lambda item: -item[1][0])[:top]:
        print(f"  {gap / 1000:7.2f} ms x{count:<5d} {gap / count:6.1f} us  {before} -> {after}")


def kernel_group(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in lowered for k in ("gemm", "nvjet", "xmma", "cutlass", "gemv", "matmul", "_mm_")):
        return "gemm"
    if lowered.startswith("triton"):
        return "triton"
    return "other"


if __name__ == "__main__":
    main()
