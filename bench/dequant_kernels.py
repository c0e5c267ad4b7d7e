"""GPU benchmark: where a quantised DiT step's extra time goes, kernel by kernel, for each linear shape of the
Qwen-Image DiT block (the 20B model's; per block the image and text streams each have q, k, v, out, two MLP linears
and a modulation linear).

For each shape and type: decoding the dense bf16 weight (our Triton kernel; for Q8_0 also the general decode kernel
it replaced, so the change is measured in the same run), what the decode moves in GB/s (quantised bytes read + bf16
bytes written), the fused decode-matmul on 2 rows (the modulation linears: the timestep embedding of a guidance
batch) against cuBLAS on the resident bf16 weight, and the bf16 GEMM on the rows a 1328x1328 guidance batch feeds it
(2 x 6889 image rows, 2 x 128 text rows), which the decode adds to. The last table sums one block.

    python bench/dequant_kernels.py --types Q8_0 Q4_K --runs 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import interleaved  # noqa: E402
from qistudio.ops import dequant_triton as K  # noqa: E402
from qistudio.ops.gguf_quantize import quantize_gguf  # noqa: E402

DIM, MLP = 3072, 12288
# (name, out features, in features, rows fed per stream, how many per stream in a block)
SHAPES = [("q/k/v/out", DIM, DIM, 4), ("mlp up", MLP, DIM, 1), ("mlp down", DIM, MLP, 1), ("modulation", 6 * DIM, DIM, 1)]
IMAGE_ROWS, TEXT_ROWS = 2 * 6889, 2 * 128


def general_q8_0(weight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The general decode kernel on Q8_0 (three byte loads per value), as before the int16 tile path."""
    out = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    K._dequantize_kernel[(-(-n // 32), -(-k // 256))](weight, weight, weight, out, n, k, 32, QCODE=0, BLOCK_N=32,
                                                       BLOCK_K=256, num_warps=4)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K"])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernels are Triton's)")
    torch.manual_seed(0)
    rows, per_block = [], {}
    for name, n, k, count in SHAPES:
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        image_x = torch.randn(IMAGE_ROWS, k, device="cuda", dtype=torch.bfloat16)
        text_x = torch.randn(TEXT_ROWS, k, device="cuda", dtype=torch.bfloat16)
        two = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
        for qtype in args.types:
            raw = quantize_gguf(dense.float(), qtype).contiguous()
            code = K.QCODES[qtype]
            cases = {
                "decode": lambda: K._dequantize_weight(raw, raw, raw, code, n, k, 32, torch.bfloat16),
                "fused 2 rows": lambda: K._quantized_matmul(two, raw, raw, raw, code, n, 32, None),
                "bf16 2 rows": lambda: F.linear(two, dense),
                "bf16 image rows": lambda: F.linear(image_x, dense),
                "bf16 text rows": lambda: F.linear(text_x, dense),
            }
            if qtype == "Q8_0":
                cases["decode (general kernel)"] = lambda: general_q8_0(raw, n, k)
                assert torch.equal(general_q8_0(raw, n, k), cases["decode"]())
            timings = interleaved(cases, runs=args.runs, warmup=2, calls=5, device="cuda")
            moved = raw.numel() + n * k * 2
            for case, timing in timings.items():
                rate = f"{moved / timing.median / 1e9:.0f} GB/s" if case.startswith("decode") else "-"
                rows.append([name, f"{n}x{k}", qtype, case, timing.text("us", 1), rate])
            totals = per_block.setdefault(qtype, {})
            for case, timing in timings.items():
                # Modulation: one per stream on 2 rows; the others: decode for each of the two streams.
                totals[case] = totals.get(case, 0.0) + 2 * count * timing.median
    text = caption("Quantised weights: decode and fused-matmul kernels per Qwen-Image DiT linear shape (bf16 out).",
                   f"median (min-max) of {args.runs} interleaved runs of 5 back-to-back calls, CUDA events")
    table = markdown_table(["linear", "N x K", "type", "kernel", "per call", "decode traffic"], rows)
    summary = []
    for qtype, totals in per_block.items():
        for case, seconds in totals.items():
            summary.append([qtype, case, f"{seconds * 1e3:.2f} ms", f"{60 * seconds * 1e3:.1f} ms"])
    note = ("Per block: each case summed over the block's two streams (q/k/v/out 4 each, MLP up and down, the "
            "modulation linear); x60 for the 60-block model (a decode runs once per linear per step, as every row "
            "case's GEMM does).")
    write_report("dequant_kernels.md", "\n\n".join([text, table, note, markdown_table(
        ["type", "kernel", "one block", "60 blocks"], summary)]))


if __name__ == "__main__":
    main()
