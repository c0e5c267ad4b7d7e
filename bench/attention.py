"""GPU micro-benchmark: joint attention of the 1328x1328 DiT (S = 6889 image + 128 text tokens, 24 heads x 128) in
each SDPA backend, and an FP8 (W8A8) linear against bf16, to choose the fast paths. Writes $OUT/attention.md.

    python bench/attention.py
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import cuda_time  # noqa: E402


def attention_rows(batch: int, seq: int, heads=24, dim=128):
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * batch * heads * seq * seq * dim
    reference = None
    rows = []
    for name, backend in [("default dispatch", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v)
                t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=3, iters=10)
        except RuntimeError as e:
            rows.append((f"sdpa {name} b={batch}", float("nan"), 0.0, str(e).splitlines()[0][:60]))
            continue
        reference = out if reference is None else reference
        err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        rows.append((f"sdpa {name} b={batch}", t, flops / t / 1e12, f"{err:.1e}"))
    # qistudio's optional backends through its one entry point (forced; sdpa is the automatic choice).
    from qistudio.ops.attention import attention, available_backends, set_attention_backend

    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D)
    for name in available_backends():
        set_attention_backend(name)
        try:
            out = attention(q_, k_, v_).transpose(1, 2)
            t = cuda_time(lambda: attention(q_, k_, v_), warmup=3, iters=10)
        except Exception as e:  # an optional kernel failing is a row, not the end of the run
            rows.append((f"qistudio {name} b={batch}", float("nan"), 0.0, str(e).splitlines()[0][:60]))
            continue
        finally:
            set_attention_backend(None)
        err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        rows.append((f"qistudio {name} b={batch}", t, flops / t / 1e12, f"{err:.1e}"))
    return rows


def padded_rows(image=6889, lengths=(23, 41), heads=24, dim=128):
    """Guidance with a prompt and a negative prompt of different lengths: a batch of 2 whose rows have different
    valid key counts. One launch given the counts (flash4's seqused_k, cuDNN FP8's padding mask) against one call
    per sample plus a join (SDPA, and the FP8 path before)."""
    from qistudio.ops.attention import attention, attention_fp8, available_backends, set_attention_backend
    from qistudio.ops.fp8 import quantize_per_tensor

    seq = image + max(lengths)
    key_lengths = [image + n for n in lengths]
    q, k, v = (torch.randn(2, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = sum(4 * heads * seq * n * dim for n in key_lengths)
    set_attention_backend("sdpa")
    reference = attention(q, k, v, key_lengths=key_lengths).float()
    rows = []
    for name in [n for n in ("sdpa", "flash4", "cudnn_fp8") if n in available_backends()]:
        set_attention_backend(name)
        try:
            out = attention(q, k, v, key_lengths=key_lengths).float()
            t = cuda_time(lambda: attention(q, k, v, key_lengths=key_lengths), warmup=3, iters=10)
        finally:
            set_attention_backend(None)
        err = ((out - reference).norm() / reference.norm()).item()
        rows.append((f"padded b=2 ({'/'.join(map(str, lengths))} text), qistudio {name}", t, flops / t / 1e12,
                     f"{err:.1e}"))
    if "cudnn_fp8" in available_backends():  # the DiT's FP8 path: pre-quantised inputs
        (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (q, k, v))
        q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
        sdpa8 = torch.ops.qistudio.cudnn_fp8_sdpa

        def per_sample():
            return torch.cat([sdpa8(q8[i:i + 1], k8[i:i + 1, :n].contiguous(), v8[i:i + 1, :n].contiguous(), dq, dk,
                                    dv) for i, n in enumerate(key_lengths)])

        def one_launch():
            return attention_fp8(q8, k8, v8, dq, dk, dv, key_lengths)

        for label, fn in (("per sample + join", per_sample), ("one launch, padding mask", one_launch)):
            out = fn().float() * dv.reshape(())
            err = ((out - reference).norm() / reference.norm()).item()
            t = cuda_time(fn, warmup=3, iters=10)
            rows.append((f"padded b=2, FP8 pre-quantised, {label}", t, flops / t / 1e12, f"{err:.1e}"))
    return rows


def fp8_rows(tokens=14034, shapes=((3072, 3072), (12288, 3072), (3072, 12288))):
    rows = []
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        flops = 2 * tokens * in_f * out_f
        t_bf16 = cuda_time(lambda: F.linear(x, w), warmup=3, iters=10)
        w_scale = w.float().abs().amax(dim=1, keepdim=True) / 448
        w8 = (w.float() / w_scale).to(torch.float8_e4m3fn)

        def quant_x():
            scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
            return (x.float() / scale).to(torch.float8_e4m3fn), scale

        quant = torch.compile(quant_x)
        x8, x_scale = quant()

        def mm():
            return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)

        def full():
            a, s = quant()
            return torch._scaled_mm(a, w8.t(), scale_a=s, scale_b=w_scale.t(), out_dtype=torch.bfloat16)

        t_mm = cuda_time(mm, warmup=3, iters=10)
        t_full = cuda_time(full, warmup=3, iters=10)
        ref = F.linear(x, w).float()
        err = ((full().float() - ref).norm() / ref.norm()).item()
        rows.append((f"linear {out_f}x{in_f} bf16", t_bf16, flops / t_bf16 / 1e12, ""))
        rows.append((f"linear {out_f}x{in_f} fp8 matmul only", t_mm, flops / t_mm / 1e12, ""))
        rows.append((f"linear {out_f}x{in_f} fp8 with act. quant", t_full, flops / t_full / 1e12, f"{err:.1e}"))
    return rows


def main() -> None:
    rows = []
    for batch in (1, 2):
        rows += attention_rows(batch, 6889 + 128)
    rows += padded_rows()
    if "--padded" not in sys.argv:
        rows += fp8_rows()
    lines = [f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}", "",
             "| case | time | TFLOP/s | rel. err / note |", "|---|---|---|---|"]
    lines += [f"| {n} | {t * 1e3:.2f} ms | {tf:.0f} | {note} |" for n, t, tf, note in rows]
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "attention.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
