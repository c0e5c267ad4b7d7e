"""The joint q/k/v preparation of a Qwen-Image block in one pass: [image; text] -> per-stream RMSNorm -> RoPE for q
and k, and the same join for v.

Reference form (`joint_qk_norm_rope_reference`, any device, differentiable): the projections are joined along the
sequence, normalised per head in float32, rounded to the compute dtype and scaled by the stream's norm weight (as
RMSNorm does), then rotated in float32 and rounded again.

Fused form (`_fused_qkv`, CUDA inference): each Triton program takes a few heads of one token, reads them once
from the image or the text projections, and writes the rotated q and k heads and the v heads straight into the
joint (B, N + L, H, head_dim) tensors that attention reads; the token's RoPE pairs are loaded once for both.
Measured on an H100 (1328x1328, batch 2): the compiled reference costs two kernels per tensor (a norm statistic,
then normalise + rotate + join), 0.22 ms for q or k; one pass for q or k alone 0.12 ms. Same roundings, in the
same order, as the reference. `_fused_fp8` does q or k alone into FP8, for FP8 attention.
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


def joint_qkv_norm_rope(img_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        txt_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        q_weights: tuple[torch.Tensor, torch.Tensor], k_weights: tuple[torch.Tensor, torch.Tensor],
                        eps: tuple[float, float], rotation: torch.Tensor, head_dim: int):
    """The joint (query, key, value) of attention over [image; text], each (B, N + L, H, head_dim): q and k as
    `joint_qk_norm_rope_reference` makes them, v joined. img_qkv: the image projections (B, N, D); txt_qkv: the
    text ones (B, L, D); q_weights, k_weights: the (image, text) RMSNorm weights; eps: q's and k's. One fused
    kernel on CUDA when no gradient is needed."""
    (img_q, img_k, img_v), (txt_q, txt_k, txt_v) = img_qkv, txt_qkv
    q_eps, k_eps = eps
    if (q_eps == k_eps and _can_fuse(img_q, txt_q, *q_weights, head_dim)
            and _can_fuse(img_k, txt_k, *k_weights, head_dim) and _can_fuse(img_v, txt_v, *q_weights, head_dim)):
        return torch.ops.qistudio.joint_qkv_norm_rope(img_q, img_k, img_v, txt_q, txt_k, txt_v, *q_weights,
                                                      *k_weights, q_eps, rotation, head_dim)
    query = joint_qk_norm_rope_reference(img_q, txt_q, *q_weights, q_eps, rotation, head_dim)
    key = joint_qk_norm_rope_reference(img_k, txt_k, *k_weights, k_eps, rotation, head_dim)
    return query, key, torch.cat([img_v, txt_v], dim=1).unflatten(-1, (-1, head_dim))


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

    # A program takes ROWS heads of one token of the joint sequence (ROWS divides HEADS), so whether the token is an
    # image or a text token, and its RoPE pairs, are decided once per program, not per element.
    @triton.jit
    def _program_token(HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        token = pid // (HEADS // ROWS)  # over (batch, joint position)
        head0 = (pid % (HEADS // ROWS)) * ROWS
        offsets = (head0 + tl.arange(0, ROWS))[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        return token, offsets

    @triton.jit
    def _source_row(token, num_img, num_txt, img_row_stride, txt_row_stride):
        # Whether the token is an image one, and its row's offset in its stream's projections.
        seq = num_img + num_txt
        batch = token // seq
        pos = token % seq
        is_img = pos < num_img
        row = tl.where(is_img, (batch * num_img + pos).to(tl.int64) * img_row_stride,
                       (batch * num_txt + pos - num_img).to(tl.int64) * txt_row_stride)
        return batch, pos, is_img, row

    @triton.jit
    def _rotation(rot_ptr, batch, pos, rot_batch_stride, HEAD_DIM: tl.constexpr):
        rotation = tl.load(rot_ptr + batch * rot_batch_stride + pos * HEAD_DIM + tl.arange(0, HEAD_DIM))
        return tl.split(tl.reshape(rotation, (HEAD_DIM // 2, 2)))  # (cos, sin) of each pair

    @triton.jit
    def _norm_rotate(x, w, cos, sin, eps, DTYPE: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
        # RMSNorm's roundings: normalised value to the compute dtype, times the weight, rounded again; then RoPE
        # in float32. x (ROWS, HEAD_DIM) float32; returns float32, unrounded.
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        normed = ((x * inv_rms).to(DTYPE).to(tl.float32) * w.to(tl.float32)[None, :]).to(DTYPE).to(tl.float32)
        real, imag = tl.split(tl.reshape(normed, (ROWS, HEAD_DIM // 2, 2)))
        return tl.reshape(tl.join(real * cos[None, :] - imag * sin[None, :], real * sin[None, :] + imag * cos[None, :]),
                          (ROWS, HEAD_DIM))

    @triton.jit
    def _joint_qk_norm_rope_kernel(img_ptr, txt_ptr, img_w_ptr, txt_w_ptr, rot_ptr, out_ptr, out_scale_ptr,
                                   num_img, num_txt, img_row_stride, txt_row_stride, rot_batch_stride, eps,
                                   HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        # One of q or k, into FP8 for FP8 attention: scaled by a bound on |out|, cast once.
        token, offsets = _program_token(HEADS, HEAD_DIM, ROWS)
        batch, pos, is_img, row = _source_row(token, num_img, num_txt, img_row_stride, txt_row_stride)
        d = tl.arange(0, HEAD_DIM)
        if is_img:
            x = tl.load(img_ptr + row + offsets)
            w = tl.load(img_w_ptr + d)
        else:
            x = tl.load(txt_ptr + row + offsets)
            w = tl.load(txt_w_ptr + d)
        cos, sin = _rotation(rot_ptr, batch, pos, rot_batch_stride, HEAD_DIM)
        out = _norm_rotate(x.to(tl.float32), w, cos, sin, eps, img_ptr.dtype.element_ty, ROWS, HEAD_DIM)
        out = (out * tl.load(out_scale_ptr)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + token.to(tl.int64) * HEADS * HEAD_DIM + offsets, out)

    @triton.jit
    def _joint_qkv_kernel(img_q_ptr, img_k_ptr, img_v_ptr, txt_q_ptr, txt_k_ptr, txt_v_ptr, img_qw_ptr, txt_qw_ptr,
                          img_kw_ptr, txt_kw_ptr, rot_ptr, q_out_ptr, k_out_ptr, v_out_ptr, num_img, num_txt,
                          img_row_stride, txt_row_stride, rot_batch_stride, eps, HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        token, offsets = _program_token(HEADS, HEAD_DIM, ROWS)
        batch, pos, is_img, row = _source_row(token, num_img, num_txt, img_row_stride, txt_row_stride)
        d = tl.arange(0, HEAD_DIM)
        if is_img:
            q, k, v = tl.load(img_q_ptr + row + offsets), tl.load(img_k_ptr + row + offsets), tl.load(
                img_v_ptr + row + offsets)
            q_w, k_w = tl.load(img_qw_ptr + d), tl.load(img_kw_ptr + d)
        else:
            q, k, v = tl.load(txt_q_ptr + row + offsets), tl.load(txt_k_ptr + row + offsets), tl.load(
                txt_v_ptr + row + offsets)
            q_w, k_w = tl.load(txt_qw_ptr + d), tl.load(txt_kw_ptr + d)
        cos, sin = _rotation(rot_ptr, batch, pos, rot_batch_stride, HEAD_DIM)
        dtype = img_q_ptr.dtype.element_ty
        out_offsets = token.to(tl.int64) * HEADS * HEAD_DIM + offsets
        tl.store(q_out_ptr + out_offsets, _norm_rotate(q.to(tl.float32), q_w, cos, sin, eps, dtype, ROWS,
                                                       HEAD_DIM).to(dtype))
        tl.store(k_out_ptr + out_offsets, _norm_rotate(k.to(tl.float32), k_w, cos, sin, eps, dtype, ROWS,
                                                       HEAD_DIM).to(dtype))
        tl.store(v_out_ptr + out_offsets, v)

    # Memory-bound; ROWS (heads per program, at most this many) and num_warps chosen by a sweep of the q/k pass on
    # an H100 (bench/kernels_check.py --sweep; in an H200 forward 4 heads and one warp 64.5 us, 8 heads with 2 warps
    # 65.6). The q/k/v pass with the same launch moves 4.1 TB/s in the forward (123 us, 1328x1328, batch 2). Not
    # triton.autotune: inductor re-benchmarks autotuned user kernels while compiling, which failed here.
    QK_LAUNCH = {"ROWS": 4, "num_warps": 1}

    def _rows_apart(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """(B, S, D) tensors of one stream and the distance between rows they share: slices of a packed
        projection (rows 3 D apart) are read in place, anything else made contiguous."""
        stride = tensors[0].stride(1)
        if all(x.stride(-1) == 1 and x.stride(1) == stride and x.stride(0) == x.shape[1] * stride for x in tensors):
            return list(tensors), stride
        return [x.contiguous() for x in tensors], tensors[0].shape[-1]

    def _launch(kernel, img: list[torch.Tensor], txt: list[torch.Tensor], weights: list[torch.Tensor],
                outputs: list[torch.Tensor], rotation: torch.Tensor, eps: float, head_dim: int):
        """Launch `kernel` over the joint tokens of image tensors `img` (B, N, D) and text tensors `txt` (B, L, D),
        with the norm `weights` and the `outputs` (and any scale) in the kernel's order."""
        batch, num_img, dim = img[0].shape
        num_txt = txt[0].shape[1]
        heads = dim // head_dim
        rows = QK_LAUNCH["ROWS"]
        while heads % rows:  # the largest power of two up to ROWS that divides the head count
            rows //= 2
        rotation = rotation.contiguous()  # (S, head_dim / 2, 2) or (B, S, head_dim / 2, 2) float32
        rot_batch_stride = rotation.stride(0) if rotation.dim() == 4 else 0
        img, img_row_stride = _rows_apart(*img)
        txt, txt_row_stride = _rows_apart(*txt)
        grid = (batch * (num_img + num_txt) * (heads // rows),)
        torch.library.wrap_triton(kernel)[grid](
            *img, *txt, *weights, rotation, *outputs, num_img, num_txt, img_row_stride, txt_row_stride,
            rot_batch_stride, eps, HEADS=heads, HEAD_DIM=head_dim, ROWS=rows, num_warps=QK_LAUNCH["num_warps"],
        )

    @torch.library.triton_op("qistudio::joint_qkv_norm_rope", mutates_args=())
    def _fused_qkv(img_q: torch.Tensor, img_k: torch.Tensor, img_v: torch.Tensor, txt_q: torch.Tensor,
                   txt_k: torch.Tensor, txt_v: torch.Tensor, img_q_weight: torch.Tensor, txt_q_weight: torch.Tensor,
                   img_k_weight: torch.Tensor, txt_k_weight: torch.Tensor, eps: float, rotation: torch.Tensor,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, num_img, dim = img_q.shape
        shape = (batch, num_img + txt_q.shape[1], dim // head_dim, head_dim)
        query, key, value = (img_q.new_empty(shape) for _ in range(3))
        _launch(_joint_qkv_kernel, [img_q, img_k, img_v], [txt_q, txt_k, txt_v],
                [img_q_weight, txt_q_weight, img_k_weight, txt_k_weight], [query, key, value], rotation, eps, head_dim)
        return query, key, value

    @torch.library.triton_op("qistudio::joint_qk_norm_rope_fp8", mutates_args=())
    def _fused_fp8(img_proj: torch.Tensor, txt_proj: torch.Tensor, img_weight: torch.Tensor,
                   txt_weight: torch.Tensor, eps: float, rotation: torch.Tensor, head_dim: int,
                   scale: torch.Tensor) -> torch.Tensor:
        batch, num_img, dim = img_proj.shape
        out = torch.empty(batch, num_img + txt_proj.shape[1], dim // head_dim, head_dim, dtype=FP8_DTYPE,
                          device=img_proj.device)
        _launch(_joint_qk_norm_rope_kernel, [img_proj], [txt_proj], [img_weight, txt_weight], [out, scale],
                rotation, eps, head_dim)
        return out
