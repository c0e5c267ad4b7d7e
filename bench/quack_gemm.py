"""The block's image GEMMs through cuBLAS (what PyTorch and diffusers run) against quack's CuTe DSL GEMMs for SM90.

    python bench/quack_gemm.py [--untuned]

1328x1328, batch 2 (13778 image rows): a q/k/v-sized projection with bias, the MLP up-projection with its bias and
tanh GELU in the epilogue, the down-projection with bias. Interleaved rounds (a power-limited card drifts), medians,
and each quack result's relative L2 against cuBLAS's. quack (`quack-kernels`, a dependency of flash-attn-4)
autotunes its tile and cluster shapes on first use unless --untuned.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import interleaved  # noqa: E402
from qistudio.ops.linear_gelu import quack_available  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--untuned", action="store_true", help="quack's default configuration, no autotuning")
    args = parser.parse_args()
    assert quack_available(), "quack does not import or does not run on this GPU"  # also applies its cache-key fix
    from quack.gemm_interface import gemm, gemm_act

    tuned = not args.untuned
    dev, bf, dim, rows = "cuda", torch.bfloat16, 3072, 2 * 6889
    x = torch.randn(rows, dim, device=dev, dtype=bf)
    hidden = torch.randn(rows, 4 * dim, device=dev, dtype=bf)
    w = (torch.randn(dim, dim, device=dev) / dim ** 0.5).to(bf)
    b = (0.1 * torch.randn(dim, device=dev)).to(bf)
    up_w = (torch.randn(4 * dim, dim, device=dev) / dim ** 0.5).to(bf)
    up_b = (0.1 * torch.randn(4 * dim, device=dev)).to(bf)
    down_w = (torch.randn(dim, 4 * dim, device=dev) / (4 * dim) ** 0.5).to(bf)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    cases = {
        "qkv-size cuBLAS": lambda: F.linear(x, w, b),
        "qkv-size quack": lambda: gemm(x, w.t(), bias=b, tuned=tuned),
        "up+gelu cuBLAS": lambda: torch._addmm_activation(up_b, x, up_w.t(), use_gelu=True),
        "up+gelu quack": lambda: gemm_act(x, up_w.t(), bias=up_b, activation="gelu_tanh_approx",
                                          store_preact=False, tuned=tuned)[1],
        "down cuBLAS": lambda: F.linear(hidden, down_w, b),
        "down quack": lambda: gemm(hidden, down_w.t(), bias=b, tuned=tuned),
    }
    for name, fn in cases.items():  # compile (and autotune) once, check against cuBLAS
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        if "quack" in name:
            ref = cases[name.replace("quack", "cuBLAS")]().float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            print(f"  {name}: first call {time.perf_counter() - start:.1f} s, rel. L2 vs cuBLAS {err:.2e}", flush=True)
    flops = {"qkv-size": 2 * rows * dim * dim, "up+gelu": 2 * rows * dim * 4 * dim, "down": 2 * rows * dim * 4 * dim}
    for name, t in interleaved(cases, runs=7, calls=10).items():
        print(f"  {name:20s} {t.text('ms')}  {flops[name.split()[0]] / t.median / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
