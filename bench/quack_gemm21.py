"""Qwen-Image 2.1's block GEMMs through cuBLAS (what PyTorch and diffusers run) against quack's CuTe DSL GEMMs.

    python bench/quack_gemm21.py [--rows 4096 16384] [--untuned]

Per target-row count (1024x1024: 4096 rows; 2048x2048: 16384), no bias anywhere (2.1 has none):
  - the SwiGLU up-projection: two cuBLAS GEMMs 4096 -> 12288 then silu(gate) * proj compiled (the eager form
    inductor leaves in a compiled block), the same with gate and proj packed into one 4096 -> 24576 cuBLAS GEMM, and
    quack's gated GEMM over the packed [gate; proj] weight (concat layout, no copy) with SiLU and the product in
    its epilogue, writing only the (rows, 12288) product;
  - a q/k/v/out-sized projection 4096 -> 4096 and q/k/v packed (4096 -> 12288): cuBLAS and quack;
  - the down-projection 12288 -> 4096: cuBLAS and quack.
Interleaved rounds (bench/timing.py), medians and spread, TFLOP/s of each, and each quack result's relative L2
against cuBLAS's.
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
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--untuned", action="store_true", help="quack's default configuration, no autotuning")
    args = parser.parse_args()
    assert quack_available(), "quack does not import or does not run on this GPU"  # also applies its cache-key fix
    from quack.gemm_interface import gemm, gemm_gated

    tuned = not args.untuned
    dev, bf, dim, hidden = "cuda", torch.bfloat16, 4096, 12288
    w = (torch.randn(dim, dim, device=dev) / dim ** 0.5).to(bf)
    qkv_w = (torch.randn(3 * dim, dim, device=dev) / dim ** 0.5).to(bf)
    up_w = (torch.randn(2 * hidden, dim, device=dev) / dim ** 0.5).to(bf)  # [gate; proj], packed
    gate_w, proj_w = up_w[:hidden], up_w[hidden:]
    down_w = (torch.randn(dim, hidden, device=dev) / hidden ** 0.5).to(bf)
    swiglu = torch.compile(lambda gate, proj: F.silu(gate) * proj)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, quack tuned={tuned}", flush=True)

    for rows in args.rows:
        x = torch.randn(rows, dim, device=dev, dtype=bf)
        h = torch.randn(rows, hidden, device=dev, dtype=bf)
        cases = {
            "up+swiglu cuBLAS x2": lambda: swiglu(F.linear(x, gate_w), F.linear(x, proj_w)),
            "up+swiglu cuBLAS packed": lambda: swiglu(*F.linear(x, up_w).chunk(2, dim=-1)),
            "up+swiglu quack": lambda: gemm_gated(x, up_w.t(), activation="swiglu", store_preact=False,
                                                  tuned=tuned, concat_layout=("B",))[1],
            "proj cuBLAS": lambda: F.linear(x, w),
            "proj quack": lambda: gemm(x, w.t(), tuned=tuned),
            "qkv cuBLAS x3": lambda: (F.linear(x, w), F.linear(x, w), F.linear(x, w)),
            "qkv cuBLAS packed": lambda: F.linear(x, qkv_w),
            "qkv quack packed": lambda: gemm(x, qkv_w.t(), tuned=tuned),
            "down cuBLAS": lambda: F.linear(h, down_w),
            "down quack": lambda: gemm(h, down_w.t(), tuned=tuned),
        }
        references = {"up+swiglu quack": "up+swiglu cuBLAS x2", "proj quack": "proj cuBLAS",
                      "qkv quack packed": "qkv cuBLAS packed", "down quack": "down cuBLAS"}
        print(f"rows {rows}:", flush=True)
        for name, fn in cases.items():  # compile (and autotune) once; quack checked against cuBLAS
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            if name in references:
                ref = cases[references[name]]().float()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                print(f"  {name}: first call {time.perf_counter() - start:.1f} s, rel. L2 vs cuBLAS {err:.2e}",
                      flush=True)
        flops = {"up+swiglu": 2 * rows * dim * 2 * hidden, "proj": 2 * rows * dim * dim,
                 "qkv": 2 * rows * dim * 3 * dim, "down": 2 * rows * hidden * dim}
        for name, t in interleaved(cases, runs=7, calls=10).items():
            print(f"  {name:24s} {t.text('ms')}  {flops[name.split()[0]] / t.median / 1e12:.0f} TFLOP/s",
                  flush=True)


if __name__ == "__main__":
    main()
