"""GPU agreement and timing of qistudio's Triton kernels against their reference forms (1328x1328, batch 2 sizes).

    python bench/kernels_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import MIN_RUNS, interleaved  # noqa: E402
from qistudio.ops import fp8_kernels  # noqa: E402
from qistudio.ops.fp8 import quantize_rows  # noqa: E402
from qistudio.ops.qk_norm_rope import joint_qk_norm_rope_reference, joint_qkv_norm_rope  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402


def compare(label: str, cases: dict, calls: int = 100) -> None:
    """Print each case's time per call (median, min-max over 5 interleaved runs of `calls` calls: short kernels)."""
    timings = interleaved(cases, runs=MIN_RUNS, warmup=1, calls=calls)
    print(f"  {label}: " + ", ".join(f"{name} {t.text('ms')}" for name, t in timings.items()), flush=True)


def sweep(label: str, configs: list, apply, fn, rounds: int = 7) -> None:
    """Time fn under each launch config, interleaved (apply(config) before each run); fastest first."""
    timings = interleaved({config: fn for config in configs}, runs=rounds, calls=50, before=apply)
    ranked = sorted(timings.items(), key=lambda item: item[1].median)
    print(f"  {label} sweep: " + ", ".join(f"{config} {t.text('ms')}" for config, t in ranked))


def main() -> None:
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    h = w = 1328 // 16
    batch, text, heads, head_dim = 2, 128, 24, 128
    img = torch.randn(batch, h * w, heads * head_dim, device=dev, dtype=bf)
    txt = torch.randn(batch, text, heads * head_dim, device=dev, dtype=bf)
    w_img = (1 + 0.1 * torch.randn(head_dim, device=dev)).to(bf)
    w_txt = (1 + 0.1 * torch.randn(head_dim, device=dev)).to(bf)
    phasors = qwen_rotary([ImageGrid(0, h, w)], text, device=dev).with_joint().joint
    img_qkv, txt_qkv = (img, img.flip(-1), img.roll(1, -1)), (txt, txt.flip(-1), txt.roll(1, -1))
    norm_weights = ((w_img, w_txt), (w_txt, w_img))

    def fused_qkv():
        return joint_qkv_norm_rope(img_qkv, txt_qkv, *norm_weights, (1e-6, 1e-6), phasors, head_dim)

    def reference_qkv():
        return (joint_qk_norm_rope_reference(img_qkv[0], txt_qkv[0], *norm_weights[0], 1e-6, phasors, head_dim),
                joint_qk_norm_rope_reference(img_qkv[1], txt_qkv[1], *norm_weights[1], 1e-6, phasors, head_dim),
                torch.cat([img_qkv[2], txt_qkv[2]], dim=1).unflatten(-1, (-1, head_dim)))

    if "--sweep" in sys.argv:
        from qistudio.ops import qk_norm_rope as qk
        sweep("q/k/v norm+rope (ROWS, num_warps)", [(r, n) for r in (2, 4, 8) for n in (1, 2, 4, 8)],
              lambda c: qk.QK_LAUNCH.update(ROWS=c[0], num_warps=c[1]), fused_qkv)
        qk.QK_LAUNCH.update(ROWS=4, num_warps=1)
    with torch.no_grad():
        refs, outs = reference_qkv(), fused_qkv()
        ref = refs[0]
        compiled = torch.compile(reference_qkv)
        for name, out, expected in zip("qkv", outs, refs):
            same = (out == expected).float().mean().item()
            print(f"joint {name}: equal elements {same:.6f}, max |diff| {(out.float() - expected.float()).abs().max():.3e}")
        compare("q/k/v", {"fused": fused_qkv, "compiled reference": compiled})

        from qistudio.ops.qk_norm_rope import joint_qk_norm_rope_fp8
        q8, descale = joint_qk_norm_rope_fp8(img, txt, w_img, w_txt, 1e-6, phasors, head_dim)
        deq = q8.float() * descale.reshape(())
        print(f"  FP8 output: rel L2 vs bf16 {((deq - ref.float()).norm() / ref.float().norm()).item():.2e}")
        compare("q/k FP8", {"fused": lambda: joint_qk_norm_rope_fp8(img, txt, w_img, w_txt, 1e-6, phasors, head_dim)})

        from qistudio.ops import ada_norm
        x, update = img, torch.randn_like(img)
        mod = (0.3 * torch.randn(batch, 1, 6 * heads * head_dim, device=dev)).to(bf).chunk(6, dim=-1)
        eager = (ada_norm.modulated_norm_float32(x, mod[0], mod[1], 1e-6),
                 *ada_norm.gated_residual_norm_float32(x, update, mod[2], mod[3], mod[4], 1e-6))
        fused = (ada_norm.modulated_norm(x, mod[0], mod[1], 1e-6),
                 *ada_norm.gated_residual_norm(x, update, mod[2], mod[3], mod[4], 1e-6))
        same = [f"{(a == b).float().mean().item():.4f} (max |diff| {(a.float() - b.float()).abs().max():.1e})"
                for a, b in zip(fused, eager)]
        print(f"adaptive norms: equal elements vs their float32 form (norm, residual, residual+norm) {', '.join(same)}")
        compiled_norm = torch.compile(lambda: ada_norm.modulated_norm_reference(x, mod[0], mod[1], 1e-6))
        compiled_residual = torch.compile(
            lambda: ada_norm.gated_residual_norm_reference(x, update, mod[2], mod[3], mod[4], 1e-6))
        if "--sweep" in sys.argv:
            def set_launch(config):
                ada_norm.ADA_LAUNCH.update(ROWS=config[0], num_warps=config[1], CHUNK=config[2])
            configs = ([(rows, warps, 0) for rows in (1, 2, 4) for warps in (4, 8, 16)]
                       + [(rows, warps, chunk) for rows in (2, 4, 8) for warps in (2, 4, 8) for chunk in (512, 1024)])
            sweep("adaptive norm (ROWS, num_warps)", configs, set_launch,
                  lambda: ada_norm.modulated_norm(x, mod[0], mod[1], 1e-6))
            sweep("gated residual + norm (ROWS, num_warps)", configs, set_launch,
                  lambda: ada_norm.gated_residual_norm(x, update, mod[2], mod[3], mod[4], 1e-6))
            set_launch((2, None, 0))
        compare("norm", {"fused": lambda: ada_norm.modulated_norm(x, mod[0], mod[1], 1e-6),
                         "compiled": compiled_norm})
        compare("residual + norm", {"fused": lambda: ada_norm.gated_residual_norm(x, update, *mod[2:5], 1e-6),
                                    "compiled": compiled_residual})

        from qistudio.ops.linear_gelu import linear_gelu, linear_gelu_reference
        rows = torch.randn(batch * (h * w + text), 3072, device=dev, dtype=bf)
        up_weight = (torch.randn(12288, 3072, device=dev) / 3072 ** 0.5).to(bf)
        up_bias = (0.1 * torch.randn(12288, device=dev)).to(bf)
        exact = linear_gelu_reference(rows.float(), up_weight.float(), up_bias.float())
        epilogue, two_step = linear_gelu(rows, up_weight, up_bias), linear_gelu_reference(rows, up_weight, up_bias)
        err = [((y.float() - exact).norm() / exact.norm()).item() for y in (epilogue, two_step)]
        compiled_mlp_up = torch.compile(linear_gelu_reference)
        print(f"linear+gelu ({rows.shape[0]}x3072 -> 12288): rel L2 vs float32, GELU in the epilogue {err[0]:.2e}, "
              f"linear then GELU {err[1]:.2e}")
        compare("linear+gelu", {"epilogue": lambda: linear_gelu(rows, up_weight, up_bias),
                                "linear then GELU (compiled)": lambda: compiled_mlp_up(rows, up_weight, up_bias),
                                "linear alone": lambda: F.linear(rows, up_weight, up_bias)}, calls=20)

        hidden = torch.randn(batch * (h * w), 12288, device=dev, dtype=bf)
        q, s = fp8_kernels.gelu_quantize_rows(hidden)
        rq, rs = quantize_rows(F.gelu(hidden, approximate="tanh"))
        print(f"gelu+quantize: equal fp8 {(q.float() == rq.float()).float().mean().item():.6f}, "
              f"max scale rel diff {((s - rs).abs() / rs).max().item():.2e}, dequant rel L2 "
              f"{((q.float() * s - rq.float() * rs).norm() / (rq.float() * rs).norm()).item():.2e}")
        ref_fn = torch.compile(lambda x: quantize_rows(F.gelu(x, approximate="tanh")))
        compare("gelu+quantize", {"fused": lambda: fp8_kernels.gelu_quantize_rows(hidden),
                                  "compiled reference": lambda: ref_fn(hidden)})

        x = torch.randn(batch, 3072, device=dev, dtype=bf)
        weight = (torch.randn(18432, 3072, device=dev) * 8).to(torch.float8_e4m3fn)
        scale = torch.full((18432,), 2.0 ** -9, device=dev)
        bias = torch.randn(18432, device=dev, dtype=bf)
        y = fp8_kernels.fp8_weight_gemv(x, weight, scale, bias)
        ry = fp8_kernels.fp8_weight_gemv_reference(x.float(), weight, scale, bias.float())
        print(f"fp8 gemv: rel L2 vs float32 {((y.float() - ry).norm() / ry.norm()).item():.2e}")
        deq = torch.compile(fp8_kernels.fp8_weight_gemv_reference)
        compare("fp8 gemv", {"fused": lambda: fp8_kernels.fp8_weight_gemv(x, weight, scale, bias),
                             "dequantise + linear (compiled)": lambda: deq(x, weight, scale, bias)})

        # Which kernels an FP8 modulation linear runs, eager and compiled (the GEMV should be the only big one).
        from torch.profiler import ProfilerActivity, profile

        from qistudio.memory.fp8_linear import FP8Linear
        layer = FP8Linear.from_linear(torch.nn.Linear(3072, 18432, device=dev, dtype=bf)).requires_grad_(False)
        temb = torch.randn(batch, 1, 3072, device=dev, dtype=bf)
        for name, fn in [("eager", layer), ("compiled", torch.compile(layer, fullgraph=True))]:
            fn(temb)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(temb)
                torch.cuda.synchronize()
            names = [e.key[:60] for e in prof.key_averages() if e.device_time_total > 0]
            print(f"FP8Linear, {temb.shape[:-1].numel()} rows, {name}: {names}")


if __name__ == "__main__":
    main()
