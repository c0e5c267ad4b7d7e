"""The GEMMs of one DiT block at 1328x1328, batch 2: three q/k/v projections against one packed projection.

    python bench/gemm_shapes.py [--text 128]

Image rows (2 x 6889) keep the card busy in any layout; text rows (2 x 128) fill a fraction of the SMs per GEMM,
so three of them in a row leave most of the card idle three times. Prints the median time of each form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import MIN_RUNS, interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--mlp", action="store_true", help="only the MLP GEMMs, whole and split")
    parser.add_argument("--mod", action="store_true", help="only the modulation GEMVs, apart and packed")
    args = parser.parse_args()
    if args.mlp:
        return mlp_splits()
    if args.mod:
        return modulation_forms()
    dev, bf, dim = "cuda", torch.bfloat16, 3072
    weights = [(torch.randn(dim, dim, device=dev) / dim ** 0.5).to(bf) for _ in range(3)]
    biases = [(0.1 * torch.randn(dim, device=dev)).to(bf) for _ in range(3)]
    packed_w, packed_b = torch.cat(weights), torch.cat(biases)
    up_w = (torch.randn(4 * dim, dim, device=dev) / dim ** 0.5).to(bf)
    down_w = (torch.randn(dim, 4 * dim, device=dev) / dim ** 0.5).to(bf)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for rows in [2 * 6889] + [2 * t for t in args.text]:
        x = torch.randn(rows, dim, device=dev, dtype=bf)
        hidden = torch.randn(rows, 4 * dim, device=dev, dtype=bf)

        def three():
            return [F.linear(x, w, b) for w, b in zip(weights, biases)]

        cases = {"q/k/v three GEMMs": three, "q/k/v one packed": lambda: F.linear(x, packed_w, packed_b),
                 f"one {dim}->{dim}": lambda: F.linear(x, weights[0]), "up": lambda: F.linear(x, up_w),
                 "down": lambda: F.linear(hidden, down_w)}
        timings = interleaved(cases, runs=MIN_RUNS, calls=100)
        same = torch.equal(torch.cat(three(), dim=-1), F.linear(x, packed_w, packed_b))
        print(f"{rows:6d} rows (packed bit-equal to three: {same}): "
              + ", ".join(f"{name} {t.text('ms', 4)}" for name, t in timings.items()))


def mlp_splits() -> None:
    """The MLP's GEMMs whole and split: by rows (each part writes a contiguous slice of one output) and, for
    comparison only, by output columns. Interleaved rounds (the card drifts); medians."""
    dev, bf, dim, rows = "cuda", torch.bfloat16, 3072, 2 * 6889
    x = torch.randn(rows, dim, device=dev, dtype=bf)
    hidden = torch.randn(rows, 4 * dim, device=dev, dtype=bf)
    up_w = (torch.randn(4 * dim, dim, device=dev) / dim ** 0.5).to(bf)
    up_b = (0.1 * torch.randn(4 * dim, device=dev)).to(bf)
    down_w = (torch.randn(dim, 4 * dim, device=dev) / dim ** 0.5).to(bf)
    up_out = torch.empty(rows, 4 * dim, device=dev, dtype=bf)
    down_out = torch.empty(rows, dim, device=dev, dtype=bf)

    def up_rows(parts):
        bounds = [rows * i // parts for i in range(parts + 1)]

        def run():
            for a, b in zip(bounds, bounds[1:]):
                torch.addmm(up_b, x[a:b], up_w.t(), out=up_out[a:b])
        return run

    def down_rows(parts):
        bounds = [rows * i // parts for i in range(parts + 1)]

        def run():
            for a, b in zip(bounds, bounds[1:]):
                torch.mm(hidden[a:b], down_w.t(), out=down_out[a:b])
        return run

    cases = {
        "up whole (addmm)": lambda: torch.addmm(up_b, x, up_w.t(), out=up_out),
        "up gelu epilogue": lambda: torch._addmm_activation(up_b, x, up_w.t(), use_gelu=True),
        "up 2 row parts": up_rows(2), "up 4 row parts": up_rows(4),
        "up 4 column parts (separate outputs)": lambda: [F.linear(x, w, b) for w, b in zip(up_w.chunk(4), up_b.chunk(4))],
        "down whole": lambda: torch.mm(hidden, down_w.t(), out=down_out),
        "down 2 row parts": down_rows(2), "down 4 row parts": down_rows(4),
        "qkv-size (13778x3072x3072) x4": lambda: [F.linear(x, w) for w in down_w.view(dim, 4, dim).unbind(1)],
    }
    flops = 2 * rows * dim * 4 * dim
    for name, t in interleaved(cases, runs=7, calls=10).items():
        print(f"  {name:40s} {t.text('ms')}  {flops / t.median / 1e12:.0f} TFLOP/s")


def modulation_forms() -> None:
    """A block's two modulation linears (3072 -> 6 x 3072, one row per sample; weights read once per call: 113 MB
    each) as two GEMVs or one over both weights packed. Interleaved rounds; medians and the HBM rate."""
    dev, bf, dim = "cuda", torch.bfloat16, 3072
    temb = F.silu(torch.randn(2, 1, dim, device=dev, dtype=bf))
    packed_w = (torch.randn(12 * dim, dim, device=dev) / dim ** 0.5).to(bf)
    packed_b = (0.1 * torch.randn(12 * dim, device=dev)).to(bf)
    img_w, txt_w = packed_w.chunk(2)
    img_b, txt_b = packed_b.chunk(2)
    cases = {
        "two GEMVs": lambda: (F.linear(temb, img_w, img_b), F.linear(temb, txt_w, txt_b)),
        "one packed GEMV": lambda: F.linear(temb, packed_w, packed_b),
        "two GEMVs, one row": lambda: (F.linear(temb[:1], img_w, img_b), F.linear(temb[:1], txt_w, txt_b)),
    }
    for name, t in interleaved(cases, runs=7, calls=20).items():
        print(f"  {name:24s} {t.text('us', 1)}  {packed_w.numel() * 2 / t.median / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
