"""GPU micro-benchmark: joint attention of the 1328x1328 DiT (S = 6889 image + 128 text tokens, 24 heads x 128) in
each SDPA backend and each of qistudio's, a padded guidance batch, and an FP8 (W8A8) linear against bf16, to choose
the fast paths. Each group's cases are timed in interleaved rounds (bench/timing.py). Writes $OUT/attention.md.

    python bench/attention.py [--padded]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import MIN_RUNS, card_load, interleaved  # noqa: E402

CALLS = 10  # attention calls per timed run (about 1-2 ms each)


def rel(out: torch.Tensor, reference: torch.Tensor) -> str:
    return f"{((out.float() - reference.float()).norm() / reference.float().norm()).item():.1e}"


def timed_group(cases: dict, flops: float, notes: dict) -> list[tuple[str, str, float, str]]:
    """(name, time text, TFLOP/s, note) of each case, the group timed in interleaved rounds."""
    timings = interleaved(cases, runs=MIN_RUNS, warmup=1, calls=CALLS)
    return [(name, t.text("ms", 2), flops / t.median / 1e12, notes[name]) for name, t in timings.items()]


def attention_rows(batch: int, seq: int, heads=24, dim=128):
    from qistudio.ops.attention import attention, available_backends, set_attention_backend

    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * batch * heads * seq * seq * dim
    reference = F.scaled_dot_product_attention(q, k, v)
    cases, notes, failed = {}, {}, []
    for name, backend in [("default dispatch", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def run(backend=backend):
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v)
        try:
            notes[f"sdpa {name} b={batch}"] = rel(run(), reference)
            cases[f"sdpa {name} b={batch}"] = run
        except RuntimeError as e:
            failed.append((f"sdpa {name} b={batch}", "", 0.0, str(e).splitlines()[0][:60]))
    # qistudio's backends through its one entry point, each forced.
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D)
    for name in available_backends():
        def run(name=name):
            set_attention_backend(name)
            try:
                return attention(q_, k_, v_)
            finally:
                set_attention_backend(None)
        try:
            notes[f"qistudio {name} b={batch}"] = rel(run().transpose(1, 2), reference)
            cases[f"qistudio {name} b={batch}"] = run
        except Exception as e:  # an optional kernel failing is a row, not the end of the run
            failed.append((f"qistudio {name} b={batch}", "", 0.0, str(e).splitlines()[0][:60]))
    return timed_group(cases, flops, notes) + failed


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
    set_attention_backend(None)
    cases, notes = {}, {}
    for name in [n for n in ("sdpa", "flash4", "cudnn_fp8") if n in available_backends()]:
        def run(name=name):
            set_attention_backend(name)
            try:
                return attention(q, k, v, key_lengths=key_lengths)
            finally:
                set_attention_backend(None)
        label = f"padded b=2 ({'/'.join(map(str, lengths))} text), qistudio {name}"
        notes[label], cases[label] = rel(run(), reference), run
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
            label = f"padded b=2, FP8 pre-quantised, {label}"
            notes[label], cases[label] = rel(fn().float() * dv.reshape(()), reference), fn
    return timed_group(cases, flops, notes)


def fp8_rows(tokens=14034, shapes=((3072, 3072), (12288, 3072), (3072, 12288))):
    rows = []
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
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

        ref = F.linear(x, w).float()
        name = f"linear {out_f}x{in_f}"
        cases = {f"{name} bf16": lambda: F.linear(x, w), f"{name} fp8 matmul only": mm,
                 f"{name} fp8 with act. quant": full}
        notes = {f"{name} bf16": "", f"{name} fp8 matmul only": "", f"{name} fp8 with act. quant": rel(full(), ref)}
        rows += timed_group(cases, 2 * tokens * in_f * out_f, notes)
    return rows


def main() -> None:
    with card_load() as load:
        rows = []
        for batch in (1, 2):
            rows += attention_rows(batch, 6889 + 128)
        rows += padded_rows()
        if "--padded" not in sys.argv:
            rows += fp8_rows()
    what = "Attention kernels at the 1328x1328 DiT's joint attention (6889 + 128 tokens, 24 heads x 128), and FP8 GEMMs."
    method = (f"each group interleaved: {MIN_RUNS} rounds of {CALLS} back-to-back calls per case after a warm-up run, "
              "CUDA events; time per call, median (min-max, n); errors against SDPA's default output")
    table = markdown_table(["case", "time per call", "TFLOP/s", "rel. err / note"],
                           [[n, t, f"{tf:.0f}", note] for n, t, tf, note in rows])
    write_report("attention.md", caption(what, method, load.text()) + "\n\n" + table)


if __name__ == "__main__":
    main()
