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

from bench.kernels_check import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", type=int, nargs="+", default=[128, 32])
    args = parser.parse_args()
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

        separate, packed = timed(three), timed(lambda: F.linear(x, packed_w, packed_b))
        same = torch.equal(torch.cat(three(), dim=-1), F.linear(x, packed_w, packed_b))
        print(f"{rows:6d} rows: q/k/v three GEMMs {separate:.4f} ms, one packed {packed:.4f} ms "
              f"({separate / packed:.2f}x, bit-equal {same}); one {dim}->{dim} {timed(lambda: F.linear(x, weights[0])):.4f} ms,"
              f" up {timed(lambda: F.linear(x, up_w)):.4f} ms, down {timed(lambda: F.linear(hidden, down_w)):.4f} ms")


if __name__ == "__main__":
    main()
