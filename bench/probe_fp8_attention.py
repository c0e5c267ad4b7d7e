"""cuDNN's FP8 attention kernel alone on the DiT's joint attention (2 x 7017 tokens, 24 heads x 128), from inputs
already in FP8 as the DiT's FP8 path hands them over: time, TFLOP/s and error against bf16 SDPA, next to cuDNN's
bf16 kernel. Needs nvidia-cudnn-frontend and a Hopper GPU.

    python bench/probe_fp8_attention.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import interleaved  # noqa: E402
from qistudio.ops.fp8 import quantize_per_tensor  # noqa: E402
from qistudio.ops.fp8_attention import cudnn_fp8_sdpa  # noqa: E402


def main() -> None:
    batch, seq, heads, dim = 2, 7017, 24, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    k = k + 0.5  # a shared offset, as real keys have
    flop = 4 * batch * seq * seq * heads * dim
    rows = slice(0, 512)  # float32 reference on the first queries
    reference = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q[:, rows], k, v)))
    reference = reference.transpose(1, 2)

    def error(out: torch.Tensor) -> float:
        return ((out[:, rows].float() - reference).norm() / reference.norm()).item()

    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (q, k, v))
    def fp8():
        return cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv)

    def bf16():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    errors = {"cuDNN FP8 SDPA": error(fp8().float() * dv.reshape(())), "cuDNN bf16 SDPA": error(bf16())}
    for name, t in interleaved({"cuDNN FP8 SDPA": fp8, "cuDNN bf16 SDPA": bf16}, calls=10).items():
        print(f"{name:16s} {t.text('ms')} {flop / t.median / 1e12:6.0f} TFLOP/s  rel. err {errors[name]:.2e}")


if __name__ == "__main__":
    main()
