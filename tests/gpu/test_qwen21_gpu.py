"""Qwen-Image 2.1's GPU fast paths at the released width against the eager bf16 model (issue 27 item 4).

The DiT at the released block shape (width 4096, 32 heads of 128, SwiGLU 12288) with random weights shared by
diffusers 0.42.1's QwenImage21Transformer2DModel and ours, QISTUDIO_QWEN21_GPU_BLOCKS blocks (default 4: every block
is the same code, and the errors below grow with depth, so fewer blocks keep the run short without hiding a broken
kernel). One edit call at 1024x1024: a prefix of text with a 1024x1024 condition image (4096 tokens), a target of
4096 tokens. Reference: diffusers' eager bf16 output of the whole joint sequence (its uncached pass: the same
numbers as its KV cache, tests/test_qwen21_dit.py). Checked: our eager model (reference forms, then the fused
kernels), each fused kernel against its reference form at full width, regional compile over the KV cache (no
recompile across steps), FP8 compute (W8A8 with bf16 attention, then with cuDNN's FP8 attention), FP8 compiled, and
the KV cache under FP8 equal to a fresh prefill. The FP8 tests quantise our DiT in place and so run last.

    python -m pytest -m gpu tests/gpu/test_qwen21_gpu.py -q -rA                     # on one GPU, about 2 minutes
    QISTUDIO_GPU_SUITE_SIZE=tiny python -m pytest -m gpu tests/gpu/test_qwen21_gpu.py -q   # plumbing on the CPU

Errors go to $OUT/qwen21_gpu.md (relative L2 of the target's velocity).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from bench.fast_paths import compiled, fused_off, reset
from bench.pair import rel_err
from bench.qwen21 import FULL, TINY, dit_pair, forward_inputs
from bench.report import caption, markdown_table, write_report
from suite import COMPILE_BACKEND, RUNS_HERE, SIZE, Report
from qistudio.ops.attention import available_backends, set_attention_backend, set_fp8_attention

BLOCKS = int(os.environ.get("QISTUDIO_QWEN21_GPU_BLOCKS", "4"))
SCALE = replace(FULL, dit={"num_layers": BLOCKS}, sizes=(1024,)) if SIZE == "full" else TINY
CUDA = SCALE.device == "cuda"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not RUNS_HERE, reason="full-width GPU test: needs CUDA (QISTUDIO_GPU_SUITE_SIZE=tiny checks its plumbing on the "
    "CPU)")]

BF16 = 1e-2  # two bf16 rounding orders (the 20B model measured 4-5e-3 at 60 blocks)
FP8 = 3e-2  # FP8 weights and activations (the 20B model: 1.3e-2 to 1.9e-2 at 60 blocks)


class Report21(Report):
    def markdown(self) -> str:
        size = SCALE.sizes[0]
        tokens = (size // SCALE.latent_factor) ** 2
        what = (f"Qwen-Image 2.1 GPU fast paths (tests/gpu/test_qwen21_gpu.py), scale {SCALE.name}: "
                f"{SCALE.dit.get('num_layers', 32)} blocks of the block shape, {size}x{size} edit ({tokens} condition "
                f"+ {tokens} target tokens), {str(SCALE.dtype).removeprefix('torch.')}, random weights shared with "
                "diffusers 0.42.1; errors are relative L2 of the target's velocity against diffusers' eager output unless the "
                "path says otherwise.")
        rows = [[test, path, f"{err:.2e}", f"{tol:.0e}", verdict] for test, path, err, tol, verdict in self.rows]
        return caption(what, "not timed (correctness only)") + "\n\n" + markdown_table(
            ["test", "fast path", "rel. err", "tolerance", "result"], rows)

    def write(self):
        return write_report("qwen21_gpu.md", self.markdown(), echo=False) if self.rows else None


@pytest.fixture(scope="module")
def models():
    """(diffusers' DiT, ours) on one set of weights; ours is quantised to FP8 by the last tests."""
    return dit_pair(SCALE)


@pytest.fixture(scope="module")
def report():
    return Report21()


@pytest.fixture(scope="module")
def case(models):
    """(layout, text states, condition tokens, target tokens, timestep) and diffusers' eager output of them."""
    reference, _ = models
    layout, text, condition, target, timestep, reference_args = forward_inputs(
        SCALE, SCALE.sizes[0], True, reference.config.in_channels, reference.config.context_in_dim)
    with torch.no_grad():
        expected = reference(**reference_args)[0][:, -layout.target.num_tokens:].float()
    return (layout, text, condition, target, timestep), expected


@pytest.fixture(autouse=True)
def _library_defaults():
    reset()
    yield
    reset()


def _cuda_only(what: str) -> None:
    if not CUDA:
        pytest.skip(f"{what} runs on CUDA only")


def _step(dit, inputs, sigma: float | None = None) -> torch.Tensor:
    layout, text, condition, target, timestep = inputs
    if sigma is not None:
        timestep = torch.full_like(timestep, sigma)
    with torch.no_grad():
        return dit(target, timestep, dit.prefill(text, condition, layout)).float()


def test_reference_output_is_not_trivial(case):
    _, expected = case
    assert torch.isfinite(expected).all() and expected.norm() > 0


@pytest.mark.parametrize("fused", ["off", "on"])
def test_eager(fused, models, case, report):
    """Our eager bf16 model, with the reference forms (fused kernels off) and with the fused kernels."""
    inputs, expected = case
    if fused == "off":
        with fused_off("qk_norm_rope", "ada_norm", "swiglu"):
            out = _step(models[1], inputs)
    else:
        out = _step(models[1], inputs)
    report.check(f"eager[fused {fused}]", f"eager, automatic attention, fused kernels {fused}", out, expected, BF16)


def test_fused_kernels_at_full_width(models, case):
    """Each kernel the 2.1 block uses against its reference form, on the released width (one bf16 step apart at
    most where a float32 sum runs in another order)."""
    _cuda_only("each Triton kernel")
    from qistudio.ops.ada_norm import gated_residual_norm_float32, modulated_norm_float32
    from qistudio.ops.single_stream import (gated_residual_scaled_norm, qkv_norm_rope, qkv_norm_rope_reference,
                                            scaled_norm, scaled_norm_reference)
    from qistudio.ops.swiglu import swiglu_quantize_rows, swiglu_quantize_rows_reference

    _, ours = models
    layout = case[0][0]
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(dev).manual_seed(5)
    tokens, dim = layout.target.num_tokens, ours.config.dim
    attn = ours.transformer_blocks[0].attn
    rotation = ours.rotations(layout, dev)[1]
    projections = [torch.randn(1, tokens, dim, device=dev, dtype=bf, generator=g) for _ in range(3)]
    weights = (attn.norm_q.weight, attn.norm_k.weight, (attn.norm_q.eps, attn.norm_k.eps), rotation, attn.head_dim)
    with torch.no_grad():
        fused = qkv_norm_rope(*projections, *weights)
        expected = qkv_norm_rope_reference(*projections, *weights)
        for out, ref in zip(fused[:2], expected[:2]):
            assert (out == ref).float().mean() > 0.999 and (out.float() - ref.float()).abs().max() < 0.07
        assert torch.equal(fused[2], expected[2])

        x, update = projections[:2]
        mod = (0.3 * torch.randn(1, 1, 3 * dim, device=dev, generator=g)).to(bf).chunk(3, dim=-1)
        scale, gate, zero = mod[0], mod[1].tanh(), torch.zeros_like(mod[0])
        normed = scaled_norm(x, zero, scale, 1e-6)
        assert (normed == modulated_norm_float32(x, zero, scale, 1e-6)).float().mean() > 0.999
        assert (normed.float() - scaled_norm_reference(x, scale, 1e-6).float()).abs().max() < 0.07
        residual, normed = gated_residual_scaled_norm(x, update, gate, zero, scale, 1e-6)
        expected_residual, expected_normed = gated_residual_norm_float32(x, update, gate, zero, scale, 1e-6)
        assert torch.equal(residual, expected_residual) and (normed == expected_normed).float().mean() > 0.999

        hidden = 3 * dim
        gate_in, proj_in = (torch.randn(tokens, hidden, device=dev, dtype=bf, generator=g) for _ in range(2))
        q8, q_scale = swiglu_quantize_rows(gate_in, proj_in)
        r8, r_scale = swiglu_quantize_rows_reference(gate_in, proj_in)
        # Triton's exp and PyTorch's may round a SiLU one bf16 step apart, now and then a row's maximum too.
        assert (q8.float() == r8.float()).float().mean() > 0.999
        assert ((q_scale - r_scale).abs() <= 1e-2 * r_scale).all()

        # The MLP's gate and up projections as quack's gated GEMM (where it runs): SiLU and the product on the
        # float32 accumulators, two roundings fewer than the reference's; a plain GEMM's error, no more.
        from qistudio.ops.linear_swiglu import linear_swiglu, linear_swiglu_reference, resolve_swiglu

        mlp = ours.transformer_blocks[0].img_mlp
        rows = torch.randn(tokens, dim, device=dev, dtype=bf, generator=g)
        if resolve_swiglu():
            packed = mlp.packed_up(rows)
            assert packed is not None and packed.data_ptr() == mlp.gate_layer.weight.data_ptr()
            fused = linear_swiglu(rows, packed).float()
            expected = linear_swiglu_reference(rows.float(), mlp.gate_layer.weight.float(), mlp.proj.weight.float())
            rounded = linear_swiglu_reference(rows, mlp.gate_layer.weight, mlp.proj.weight).float()
            assert rel_err(fused, expected) <= rel_err(rounded, expected) + 1e-3


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled(models, case, report):
    """Regional compile (the library's, automatic attention, fused kernels) over the KV cache: the eager function,
    and steps at other noise levels compile nothing new."""
    inputs, expected = case
    _, ours = models
    with compiled(ours, COMPILE_BACKEND):
        out = _step(ours, inputs)
        graphs = _graphs()
        for sigma in (0.9, 0.3):
            _step(ours, inputs, sigma)
        assert _graphs() == graphs, "a denoising step at another noise level compiled again"
    report.check("compiled", f"regional compile ({COMPILE_BACKEND}), KV cache, fused kernels", out, expected, BF16)


@pytest.fixture(scope="module")
def fp8_dit(models):
    """Our DiT with its block linears quantised to FP8 (in place: the bf16 tests ran first)."""
    from qistudio.memory.fp8_linear import dit_fp8_predicate, quantize_linears

    _, ours = models
    quantize_linears(ours, dit_fp8_predicate)
    return ours


@pytest.mark.parametrize("attention", ["bf16", "cudnn_fp8"])
def test_fp8_compute(attention, fp8_dit, case, report):
    """W8A8 block linears (the SwiGLU product quantised in one pass) with the automatic bf16 attention, then with
    cuDNN's FP8 attention of the target over the cached prefix."""
    _cuda_only("FP8 compute (torch._scaled_mm)")
    if attention == "cudnn_fp8" and "cudnn_fp8" not in available_backends():
        pytest.skip("cuDNN's FP8 attention is not installed or cannot run here")
    from qistudio.memory.fp8_linear import set_fp8_compute

    inputs, expected = case
    set_fp8_compute(fp8_dit, True)
    set_fp8_attention(fp8_dit, attention == "cudnn_fp8")
    try:
        out = _step(fp8_dit, inputs)
        if attention == "cudnn_fp8":
            set_fp8_attention(fp8_dit, False)
            assert (out - _step(fp8_dit, inputs)).norm() > 0, "FP8 attention did not run"
    finally:
        set_fp8_attention(fp8_dit, False)
    report.check(f"fp8_compute[{attention}]", f"W8A8, eager, {attention} attention", out, expected, FP8)


def test_fp8_compiled_and_its_kv_cache(fp8_dit, case, report):
    """The FP8 fast path as `enable_fp8_computation()` sets it, under regional compile; the cached prefix serves a
    second step exactly as a fresh prefill does (the pipeline's use_kv_cache=False)."""
    _cuda_only("FP8 compute (torch._scaled_mm)")
    from qistudio.memory.fp8_linear import set_fp8_compute

    inputs, expected = case
    layout, text, condition, target, timestep = inputs
    set_fp8_compute(fp8_dit, True)
    set_fp8_attention(fp8_dit, True)
    try:
        with compiled(fp8_dit, COMPILE_BACKEND), torch.no_grad():
            out = _step(fp8_dit, inputs)
            cache = fp8_dit.prefill(text, condition, layout)
            fp8_dit(target, timestep, cache)
            again = fp8_dit(target, timestep * 0.5, cache)
            fresh = fp8_dit(target, timestep * 0.5, fp8_dit.prefill(text, condition, layout))
    finally:
        set_fp8_attention(fp8_dit, False)
        set_attention_backend(None)
    assert torch.equal(again, fresh)
    report.check("fp8_compiled", f"W8A8 + FP8 attention where it runs, regional compile ({COMPILE_BACKEND})", out,
                 expected, FP8)
