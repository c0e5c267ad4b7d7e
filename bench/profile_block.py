"""GPU profile of one full-size DiT block (1328x1328, batch 2, regional compile): where the time goes, by kernel.

    python bench/profile_block.py [--fp8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import measure  # noqa: E402
from qistudio.models.dit import DiTBlock, DiTConfig  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--fp8-attention", action="store_true", help="with --fp8: cuDNN FP8 attention too")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    parser.add_argument("--rows", type=int, default=18, help="kernels listed")
    parser.add_argument("--check", action="store_true", help="also compare the compiled block with eager")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings, e.g. coordinate_descent_tuning=True triton.multi_kernel=1")
    args = parser.parse_args()
    for setting in args.inductor:
        key, value = setting.split("=")
        owner = torch._inductor.config
        *path, leaf = key.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, eval(value))
    cfg = DiTConfig()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        block = DiTBlock(cfg).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    if args.fp8:
        from qistudio.memory.fp8_linear import quantize_linears, set_fp8_compute

        quantize_linears(block, lambda name, module: True)
        set_fp8_compute(block, True)
        if args.fp8_attention:
            from qistudio.ops.attention import set_fp8_attention

            set_fp8_attention(block, True)
    h = w = 1328 // 16
    batch, text = 2, 128
    img = torch.randn(batch, h * w, cfg.dim, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(batch, text, cfg.dim, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(batch, 1, cfg.dim, device="cuda", dtype=torch.bfloat16)
    rotary = qwen_rotary([ImageGrid(0, h, w)], text, device="cuda")
    compiled = torch.compile(block, fullgraph=True, mode=None if args.mode == "default" else args.mode)

    def run():
        with torch.no_grad():
            return compiled(img, txt, temb, temb, rotary)

    if args.check:  # the compiled block against eager, with the fused kernels and with their reference forms
        from qistudio.ops import ada_norm

        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        with torch.no_grad():
            ada_norm.set_fused_ada_norm(False)
            reference = block(img, txt, temb, temb, rotary)
            ada_norm.set_fused_ada_norm(True)
            eager = block(img, txt, temb, temb, rotary)
            compiled_out = run()
        for name, out in (("eager, fused norms", eager), ("compiled, fused norms", compiled_out)):
            print(f"{name} vs eager reference norms: image {rel(out[0], reference[0]):.2e}, "
                  f"text {rel(out[1], reference[1]):.2e}")
    block = measure(run, warmup=3, calls=10)
    print(f"block: {block.text('ms')} (x60 = {block.median * 60:.3f} s)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels)
    for e in kernels[: args.rows]:
        print(f"{e.device_time_total / 5000:7.3f} ms {100 * e.device_time_total / total:5.1f}% x{e.count // 5:<3d} {e.key[:120]}")


if __name__ == "__main__":
    main()
