"""FlashAttention 4's Hopper forward at the DiT's attention shape, over tile sizes and its two pipeline flags.

    python bench/flash4_tiles.py [--seq 7017] [--batch 2]

The wheel picks 128x128 tiles for head_dim 128 on SM90 (FA3's C++ kernel uses 128x176 for non-causal attention);
this times the candidates interleaved (a power-limited card drifts) and checks each against the default output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import MIN_RUNS, interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=6889 + 128)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from flash_attn.cute.interface import _flash_attn_fwd

    torch.manual_seed(0)
    shape = (args.batch, args.seq, 24, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * args.batch * args.seq**2 * 24 * 128
    configs = [None] + [((128, n), rs, ol) for n in (112, 128, 144, 160, 176, 192) for rs, ol in
                        ((True, True), (False, True))] + [((192, 128), False, True), ((192, 112), False, True),
                                                          ((64, 256), True, True)]
    reference = _flash_attn_fwd(q, k, v)[0]
    runs = {}
    for config in configs:
        kwargs = {} if config is None else dict(tile_mn=config[0], mma_pv_is_rs=config[1], intra_wg_overlap=config[2])
        try:
            out = _flash_attn_fwd(q, k, v, **kwargs)[0]
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            runs[config] = (lambda kw=kwargs: _flash_attn_fwd(q, k, v, **kw), err)
        except Exception as exc:  # a tile the kernel cannot build (registers, shared memory)
            print(f"{config}: {type(exc).__name__}: {str(exc)[:120]}")
    timings = interleaved({config: fn for config, (fn, _) in runs.items()}, runs=MIN_RUNS, calls=10)
    print(f"{torch.cuda.get_device_name()}, B={args.batch}, S={args.seq}, 24 heads of 128")
    for config, t in sorted(timings.items(), key=lambda item: item[1].median):
        print(f"  {str(config or 'default (128, 128) RS OL'):36s} {t.text('ms')}  {flops / t.median / 1e12:.0f} "
              f"TFLOP/s  rel L2 vs default {runs[config][1]:.1e}")


if __name__ == "__main__":
    main()
