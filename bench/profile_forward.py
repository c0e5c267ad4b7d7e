"""Where a whole compiled DiT forward's wall time goes: GPU kernel time against wall time, and the host's share.

Full-size random weights, 1328x1328, guidance batched (batch 2). If the host takes about as long to issue a forward
as the GPU takes to run it, the gaps between kernels are the host's doing.

    python bench/profile_forward.py [--fp8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import TEXT_LEN, cuda_time  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp8", action="store_true", help="W8A8 linears and FP8 attention")
    args = parser.parse_args()
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
    compile_repeated_blocks(dit)
    h = w = 1328 // 16
    tokens = torch.randn(2, h * w, 64, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, TEXT_LEN, 3584, device="cuda", dtype=torch.bfloat16)
    sigma = torch.full((2,), 0.5, device="cuda")
    rotary = qwen_rotary([ImageGrid(0, h, w)], TEXT_LEN, device="cuda")

    def forward():
        with torch.no_grad():
            return dit(tokens, text, sigma, rotary)

    wall = cuda_time(forward)
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
    kernels.sort(key=lambda e: -e.device_time_total)
    for e in kernels[:12]:
        print(f"{e.device_time_total / 1000:8.2f} ms x{e.count:<4d} {e.key[:100]}")


if __name__ == "__main__":
    main()
