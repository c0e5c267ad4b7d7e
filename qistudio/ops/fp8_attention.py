"""FP8 attention through cuDNN's fused FP8 SDPA (the `cudnn` package, nvidia-cudnn-frontend), Hopper and newer.

Used by the DiT under FP8 compute (`pipe.enable_fp8_computation()`, `set_fp8_attention`), or everywhere with
`set_attention_backend("cudnn_fp8")`; never for bf16 compute. Measured on an H200 at the DiT's joint attention
(2 x 7017 tokens, 24 heads x 128): the kernel takes 1.40 ms against 1.91 ms for cuDNN's bf16 kernel (866 against
633 TFLOP/s) at 6% relative error of the attention output on random inputs (bf16: 0.2%); in the whole DiT under
W8A8 the output's error stays 1.33% (1.33% without it) and the forward drops from 0.393 s to 0.356 s (H100,
1328x1328, batch 2; bench/RESULTS.md).

Scaling, per tensor: v (and, on bf16 inputs, q and k) is scaled so that its absolute maximum maps to 448 (e4m3's
largest value); in the DiT, q and k arrive in FP8 from the norm + RoPE kernel with a bound computed from the norm
weights (ops/qk_norm_rope.py). The softmax probabilities P <= 1 are scaled by 448. The output O (a convex
combination of the rows of V, so |O| <= max |V|) is written in FP8 with v's scale (Hopper's kernel writes FP8
only): the DiT hands it to its W8A8 projections as it is; `cudnn_fp8_attention` scales it back to bf16.

One cuDNN graph is built per (q shape, k shape, device) and kept (about a second to build); the call is a custom
op, so torch.compile keeps it as one opaque node. Off CUDA the op has a reference form (the operands dequantised,
attention in float32, the output quantised with v's scale), used only inside `fp8_attention_reference()`: tests of
the code around the kernel (sequence parallelism over gloo) run FP8 attention on the CPU with it.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .fp8 import FP8_DTYPE, FP8_MAX, quantize_per_tensor
from .fused import key_lengths_tensor

try:
    import cudnn
except ImportError:  # optional: pip install nvidia-cudnn-frontend
    cudnn = None


def cudnn_fp8_available(device: torch.device | None = None) -> bool:
    if cudnn is None or not torch.cuda.is_available():
        return False
    index = None if device is None else torch.device(device).index
    return _capability(torch.cuda.current_device() if index is None else index) >= 9


_reference = False


@contextmanager
def fp8_attention_reference():
    """Inside: FP8 attention runs where cuDNN's kernel cannot (the CPU), in the op's reference form. Outside, the
    CPU computes exactly as without FP8 attention."""
    global _reference
    previous, _reference = _reference, True
    try:
        yield
    finally:
        _reference = previous


def fp8_attention_runs(device: torch.device) -> bool:
    """Whether FP8 attention can run on `device`: cuDNN's kernel, or the reference form where it is asked for."""
    device = torch.device(device)
    return cudnn_fp8_available(device) if device.type == "cuda" else _reference


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


class _Graph:
    """A built cuDNN FP8 SDPA graph for one layout, with its workspace and constant scales."""

    def __init__(self, q_shape: tuple[int, ...], kv_shape: tuple[int, ...], device: torch.device, padded: bool):
        # Tensors are contiguous (B, S, H, D) in memory; cuDNN is told (B, H, S, D) dims.
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        self.handle = cudnn.create_handle()
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                              handle=self.handle)

        def layout(shape):
            batch, seq, heads, dim = shape
            return (batch, heads, seq, dim), (seq * heads * dim, dim, heads * dim, 1)

        (q_dims, q_strides), (kv_dims, kv_strides) = layout(q_shape), layout(kv_shape)
        dim = q_shape[3]
        self.q = graph.tensor(name="q", dim=q_dims, stride=q_strides, data_type=e4m3)
        self.k, self.v = (graph.tensor(name=n, dim=kv_dims, stride=kv_strides, data_type=e4m3) for n in ("k", "v"))
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
        self.dq, self.dk, self.dv, self.ds, self.ss, self.so = (graph.tensor(name=n, **scalar)
                                                                for n in ("dq", "dk", "dv", "ds", "ss", "so"))
        padding = {}
        if padded:  # per-sample valid key counts: a padded batch in one launch (every query row is computed)
            lengths = dict(dim=(q_shape[0], 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.INT32)
            self.seq_q, self.seq_kv = (graph.tensor(name=n, **lengths) for n in ("seq_q", "seq_kv"))
            padding = dict(use_padding_mask=True, seq_len_q=self.seq_q, seq_len_kv=self.seq_kv)
            self.seq_q_lengths = torch.full((q_shape[0], 1, 1, 1), q_shape[1], dtype=torch.int32, device=device)
        out, _, amax_s, amax_o = graph.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.dq, descale_k=self.dk, descale_v=self.dv,
            descale_s=self.ds, scale_s=self.ss, scale_o=self.so, attn_scale=1.0 / math.sqrt(dim),
            use_causal_mask=False, generate_stats=False, **padding)
        out.set_output(True).set_dim(q_dims).set_stride(q_strides).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.out, self.amax_s, self.amax_o = graph, out, amax_s, amax_o
        self.workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        self.amax_buffers = torch.zeros(2, 1, 1, 1, 1, device=device)
        self.p_scale = torch.full((1, 1, 1, 1), FP8_MAX, device=device)  # P <= 1
        self.p_descale = 1.0 / self.p_scale

    def __call__(self, q8, k8, v8, dq, dk, dv, kv_lengths: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(q8.shape[0], q8.shape[1], q8.shape[2], v8.shape[3], device=q8.device, dtype=FP8_DTYPE)
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        tensors = {self.q: q8, self.k: k8, self.v: v8, self.dq: dq, self.dk: dk, self.dv: dv,
                   self.ds: self.p_descale, self.ss: self.p_scale, self.so: 1.0 / dv, self.out: out,
                   self.amax_s: self.amax_buffers[0], self.amax_o: self.amax_buffers[1]}
        if kv_lengths is not None:
            tensors.update({self.seq_q: self.seq_q_lengths, self.seq_kv: kv_lengths})
        self.graph.execute(tensors, self.workspace, handle=self.handle)
        return out


_graphs: dict[tuple, _Graph] = {}


@torch.library.custom_op("qistudio::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                   k_descale: torch.Tensor, v_descale: torch.Tensor,
                   key_lengths: list[int] | None = None) -> torch.Tensor:
    """Contiguous float8 (B, S_q, H, D) q and (B, S_kv, H, D) k, v with (1, 1, 1, 1) descales -> float8 output
    (B, S_q, H, D) whose descale is v's. key_lengths[i]: the valid leading keys of sample i (cuDNN's padding
    mask), so a padded batch is one launch."""
    if not q8.is_cuda:
        return _reference_sdpa(q8, k8, v8, q_descale, k_descale, v_descale, key_lengths)
    padded = key_lengths is not None
    cache_key = (tuple(q8.shape), tuple(k8.shape), q8.device, padded)
    graph = _graphs.get(cache_key)
    if graph is None:
        graph = _graphs[cache_key] = _Graph(tuple(q8.shape), tuple(k8.shape), q8.device, padded)
    kv_lengths = key_lengths_tensor(tuple(key_lengths), q8.device).reshape(-1, 1, 1, 1) if padded else None
    return graph(q8, k8, v8, q_descale, k_descale, v_descale, kv_lengths)


def _reference_sdpa(q8, k8, v8, q_descale, k_descale, v_descale, key_lengths=None) -> torch.Tensor:
    """The op's arithmetic without cuDNN: dequantised operands, float32 attention over each sample's valid keys,
    the output quantised with v's scale (|O| <= max |V|, so it fits e4m3 as the kernel's does)."""
    query, key, value = ((x.float() * descale.reshape(())).transpose(1, 2)
                         for x, descale in ((q8, q_descale), (k8, k_descale), (v8, v_descale)))
    lengths = key_lengths or [key.shape[2]] * key.shape[0]
    out = torch.cat([F.scaled_dot_product_attention(query[i : i + 1], key[i : i + 1, :, :n], value[i : i + 1, :, :n])
                     for i, n in enumerate(lengths)]).transpose(1, 2)
    return (out / v_descale.reshape(())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, q_descale, k_descale, v_descale, key_lengths=None):
    return torch.empty_like(q8)


def quantize_joined(parts: list[torch.Tensor], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S_i, D) tensors joined along the sequence as float8 (B, sum S_i, D / head_dim, head_dim) with one
    descale. The absolute maximum is taken per part (compiled, a reduction over a join was 4x slower on an H200),
    the join and the cast are one pass."""
    amax = torch.stack([part.abs().amax() for part in parts]).amax().float().clamp(min=1e-12)
    scale = FP8_MAX / amax
    joined = torch.cat(parts, dim=1).unflatten(-1, (-1, head_dim))
    return (joined.float() * scale).to(FP8_DTYPE), (1.0 / scale).reshape(1, 1, 1, 1)


def cudnn_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_lengths: list[int] | None = None) -> torch.Tensor:
    """(B, S_q, H, D) q and (B, S_kv, H, D) k, v (bf16/fp16) -> (B, S_q, H, D) in q's dtype; key_lengths as
    `cudnn_fp8_sdpa`'s."""
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (query, key, value))
    out8 = torch.ops.qistudio.cudnn_fp8_sdpa(q8.contiguous(), k8.contiguous(), v8.contiguous(), dq, dk, dv,
                                             key_lengths)
    return (out8.float() * dv).to(query.dtype)
