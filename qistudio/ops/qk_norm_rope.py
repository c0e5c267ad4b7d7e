"""The joint q/k preparation of a Qwen-Image block in one pass: [image; text] -> per-stream RMSNorm -> RoPE.

Reference form (`joint_qk_norm_rope_reference`, any device, differentiable): the projections are joined along the
sequence, normalised per head in float32, rounded to the compute dtype and scaled by the stream's norm weight (as
RMSNorm does), then rotated in float32 and rounded again.

Fused form (`_fused`, CUDA inference): each Triton program takes a few heads of one token, reads them once from
the image or the text projection, and writes the rotated heads straight into the joint (B, N + L, H, head_dim)
tensor that attention reads. Measured on an H100 (1328x1328, batch 2): the compiled reference costs two kernels
per tensor (a norm statistic, then normalise + rotate + join), 0.22 ms for q or k; this pass 0.12 ms. Same
roundings, in the same order, as the reference. `_fused_fp8` writes FP8 instead, for FP8 attention.
"""

from __future__ import annotations

import torch

from .fp8 import FP8_DTYPE, FP8_MAX
from .fused import triton_inference
from .norms import rms_normalize
from .rope import apply_rotation

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference form serves
    triton = None


def joint_qk_norm_rope_reference(img_proj: torch.Tensor, txt_proj: torch.Tensor, img_weight: torch.Tensor,
                                 txt_weight: torch.Tensor, eps: float, rotation: torch.Tensor,
                                 head_dim: int) -> torch.Tensor:
    """img_proj (B, N, D), txt_proj (B, L, D) -> (B, N + L, D / head_dim, head_dim); rotation: Rotary.joint, the
    (cos, sin) pairs (N + L, head_dim / 2, 2), or one table per row (B, N + L, head_dim / 2, 2)."""
    joint = torch.cat([img_proj, txt_proj], dim=1).unflatten(-1, (-1, head_dim))
    num_img, num_txt = img_proj.shape[1], txt_proj.shape[1]
    weight = torch.cat([img_weight.expand(num_img, -1), txt_weight.expand(num_txt, -1)])[:, None]
    return apply_rotation(rms_normalize(joint, eps).to(weight.dtype) * weight, rotation)


def joint_qk_norm_rope(img_proj: torch.Tensor, txt_proj: torch.Tensor, img_weight: torch.Tensor,
                       txt_weight: torch.Tensor, eps: float, rotation: torch.Tensor, head_dim: int) -> torch.Tensor:
    """As `joint_qk_norm_rope_reference`; one fused kernel on CUDA when no gradient is needed."""
    if _can_fuse(img_proj, txt_proj, img_weight, txt_weight, head_dim):
        return torch.ops.qistudio.joint_qk_norm_rope(img_proj, txt_proj, img_weight, txt_weight, eps, rotation,
                                                     head_dim)
    return joint_qk_norm_rope_reference(img_proj, txt_proj, img_weight, txt_weight, eps, rotation, head_dim)


def joint_qk_norm_rope_fp8(img_proj: torch.Tensor, txt_proj: torch.Tensor, img_weight: torch.Tensor,
                           txt_weight: torch.Tensor, eps: float, rotation: torch.Tensor,
                           head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same q or k in float8_e4m3fn with its descale (1, 1, 1, 1), for FP8 attention.

    The scale needs no pass over the data: an RMS-normalised head has norm sqrt(head_dim), RoPE keeps each pair's
    norm, so every element is at most sqrt(head_dim) * max|weight|; that bound maps to 448.
    """
    bound = torch.maximum(img_weight.detach().abs().amax(), txt_weight.detach().abs().amax()).float()
    scale = (FP8_MAX / (bound * head_dim ** 0.5)).reshape(1)
    if _can_fuse(img_proj, txt_proj, img_weight, txt_weight, head_dim):
        out = torch.ops.qistudio.joint_qk_norm_rope_fp8(img_proj, txt_proj, img_weight, txt_weight, eps, rotation,
                                                        head_dim, scale)
    else:
        rotated = joint_qk_norm_rope_reference(img_proj, txt_proj, img_weight, txt_weight, eps, rotation, head_dim)
        out = (rotated.float() * scale).to(FP8_DTYPE)
    return out, (1.0 / scale).reshape(1, 1, 1, 1)


def _can_fuse(img_proj, txt_proj, img_weight, txt_weight, head_dim: int) -> bool:
    if _disabled or not triton_inference(img_proj, txt_proj, img_weight, txt_weight):
        return False
    half = head_dim // 2
    return head_dim % 2 == 0 and half & (half - 1) == 0 and img_proj.dtype == txt_proj.dtype == img_weight.dtype


_disabled = False


def set_fused_qk_norm_rope(enabled: bool) -> None:
    """Switch the fused kernel off (or back on), for comparisons."""
    global _disabled
    _disabled = not enabled


if triton is not None:

    @triton.jit
    def _joint_qk_norm_rope_kernel(img_ptr, txt_ptr, img_w_ptr, txt_w_ptr, rot_ptr, out_ptr, out_scale_ptr,
                                   num_img, num_txt, img_row_stride, txt_row_stride, rot_batch_stride, eps,
                                   HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                                   FP8_OUT: tl.constexpr):
        # A program takes ROWS heads of one token of the joint sequence (ROWS divides HEADS), so whether the token
        # is an image or a text token, and its RoPE pairs, are decided once per program, not per element.
        pid = tl.program_id(0)
        token = pid // (HEADS // ROWS)  # over (batch, joint position)
        head0 = (pid % (HEADS // ROWS)) * ROWS
        seq = num_img + num_txt
        batch = token // seq
        pos = token % seq
        width = HEADS * HEAD_DIM
        offsets = (head0 + tl.arange(0, ROWS))[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        d = tl.arange(0, HEAD_DIM)
        if pos < num_img:
            x = tl.load(img_ptr + (batch * num_img + pos).to(tl.int64) * img_row_stride + offsets).to(tl.float32)
            w = tl.load(img_w_ptr + d).to(tl.float32)
        else:
            x = tl.load(txt_ptr + (batch * num_txt + pos - num_img).to(tl.int64) * txt_row_stride
                        + offsets).to(tl.float32)
            w = tl.load(txt_w_ptr + d).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        dtype = img_ptr.dtype.element_ty
        # RMSNorm's roundings: normalised value to the compute dtype, times the weight, rounded again.
        normed = ((x * inv_rms).to(dtype).to(tl.float32) * w[None, :]).to(dtype).to(tl.float32)
        real, imag = tl.split(tl.reshape(normed, (ROWS, HEAD_DIM // 2, 2)))
        rotation = tl.load(rot_ptr + batch * rot_batch_stride + pos * HEAD_DIM + d)  # (cos, sin) of each pair
        cos, sin = tl.split(tl.reshape(rotation, (HEAD_DIM // 2, 2)))
        out = tl.reshape(tl.join(real * cos[None, :] - imag * sin[None, :], real * sin[None, :] + imag * cos[None, :]),
                         (ROWS, HEAD_DIM))
        if FP8_OUT:  # for FP8 attention: scaled by a bound on |out|, cast once
            out = (out * tl.load(out_scale_ptr)).to(out_ptr.dtype.element_ty)
        else:
            out = out.to(dtype)
        tl.store(out_ptr + token.to(tl.int64) * width + offsets, out)

    # Memory-bound; ROWS (heads per program, at most this many) and num_warps chosen by a sweep on an H100
    # (bench/kernels_check.py --sweep). Not triton.autotune: inductor re-benchmarks autotuned user kernels while
    # compiling, which failed here.
    QK_LAUNCH = {"ROWS": 4, "num_warps": 1}

    def _evenly_spaced_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x (B, S, D) and the distance between its rows: a slice of a packed projection (rows 3 D apart) is read
        in place, anything else made contiguous."""
        if x.stride(-1) == 1 and x.stride(0) == x.shape[1] * x.stride(1):
            return x, x.stride(1)
        return x.contiguous(), x.shape[-1]

    def _launch(img_proj, txt_proj, img_weight, txt_weight, eps, rotation, head_dim, out, out_scale):
        batch, num_img, dim = img_proj.shape
        num_txt = txt_proj.shape[1]
        heads = dim // head_dim
        rows = QK_LAUNCH["ROWS"]
        while heads % rows:  # the largest power of two up to ROWS that divides the head count
            rows //= 2
        rotation = rotation.contiguous()  # (S, head_dim / 2, 2) or (B, S, head_dim / 2, 2) float32
        rot_batch_stride = rotation.stride(0) if rotation.dim() == 4 else 0
        grid = (batch * (num_img + num_txt) * (heads // rows),)
        img_proj, img_row_stride = _evenly_spaced_rows(img_proj)
        txt_proj, txt_row_stride = _evenly_spaced_rows(txt_proj)
        torch.library.wrap_triton(_joint_qk_norm_rope_kernel)[grid](
            img_proj, txt_proj, img_weight, txt_weight, rotation, out, out_scale,
            num_img, num_txt, img_row_stride, txt_row_stride, rot_batch_stride, eps, HEADS=heads, HEAD_DIM=head_dim, ROWS=rows,
            FP8_OUT=out.dtype == FP8_DTYPE, num_warps=QK_LAUNCH["num_warps"],
        )

    @torch.library.triton_op("qistudio::joint_qk_norm_rope", mutates_args=())
    def _fused(img_proj: torch.Tensor, txt_proj: torch.Tensor, img_weight: torch.Tensor, txt_weight: torch.Tensor,
               eps: float, rotation: torch.Tensor, head_dim: int) -> torch.Tensor:
        batch, num_img, dim = img_proj.shape
        out = img_proj.new_empty(batch, num_img + txt_proj.shape[1], dim // head_dim, head_dim)
        _launch(img_proj, txt_proj, img_weight, txt_weight, eps, rotation, head_dim, out, img_weight)
        return out

    @torch.library.triton_op("qistudio::joint_qk_norm_rope_fp8", mutates_args=())
    def _fused_fp8(img_proj: torch.Tensor, txt_proj: torch.Tensor, img_weight: torch.Tensor,
                   txt_weight: torch.Tensor, eps: float, rotation: torch.Tensor, head_dim: int,
                   scale: torch.Tensor) -> torch.Tensor:
        batch, num_img, dim = img_proj.shape
        out = torch.empty(batch, num_img + txt_proj.shape[1], dim // head_dim, head_dim, dtype=FP8_DTYPE,
                          device=img_proj.device)
        _launch(img_proj, txt_proj, img_weight, txt_weight, eps, rotation, head_dim, out, scale)
        return out
