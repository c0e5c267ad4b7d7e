"""The Qwen-Image 2.1 DiT: single-stream blocks over one interleaved text/image sequence, block-causal attention.

Design note. The sequence is [prefix; target]: the prefix holds the text states with each condition image's latent
tokens in the vision slots the text encoder reserved (models/layout21.py), the target is the image being denoised.
Attention is block-causal: each text token sees what precedes it, each image block also sees itself in full, and
the target, last, sees everything. Two facts follow. The prefix never attends to the target, and with
`causal_condition` it is modulated from t = 0, so its activations do not depend on the step or the noise: its keys
and values can be computed once (`prefill`) and reused at every step, when only the target's tokens run
(`forward`). Without the cache the prefix is simply prefilled again at each step (`causal_condition=False` needs
that: its prefix is modulated from the step's timestep). The reference's single joint pass computes exactly these
numbers: its prefix rows never read target rows, and their outputs are discarded. Training, which needs no cache,
runs both in one walk over the blocks (`joint`: each block once, over the prefix then the target), bit-equal to the
two passes, so that a block's hooks (FSDP2's gradient reduce-scatter) fire once a step.

Blocks hold no modulation of their own: one shared `modulation` projection of the timestep embedding gives
[scale1, gate1, scale2, gate2] for every block (no shift; gates through tanh). Module names follow the diffusers
checkpoint (`transformer_blocks.N.attn.to_q`, `img_mlp.gate_layer`, `txt_in.text_norm`, ...), so it loads by
identity. No linear has a bias.

Speed paths, each equal to the eager arithmetic within its rounding (tests/test_qwen21_fast.py): on CUDA the
block's q/k/v norm + RoPE and its two adaptive norms are the 20B model's fused kernels, used for one stream and no
shift (ops/single_stream.py); in bf16 where quack runs, the MLP's gate and up projections are one gated GEMM
with SiLU and the product in its epilogue (ops/linear_swiglu.py); under FP8 compute (`pipe.enable_fp8_computation()`)
the block linears are W8A8, the SwiGLU product is quantised in one pass (ops/swiglu.py) and the target pass attends
in FP8 over the cached prefix (`Attention21.attend_fp8`); under regional compile (`pipe.compile()`) the target pass
runs compiled, the prefill eagerly (`_call_eagerly`).

Shapes: B batch, P prefix tokens, T target tokens, D = heads * head_dim, H heads, C latent channels (64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import attention, attention_fp8, fp8_attention_enabled, prefix_attention
from ..ops.fp8 import FP8_DTYPE
from ..ops.fp8_attention import quantize_joined
from ..ops.linear_swiglu import linear_swiglu, swiglu_fusable
from ..ops.rope import rope_tables
from ..ops.single_stream import gated_residual_scaled_norm, qk_norm_rope_fp8, qkv_norm_rope, scaled_norm
from .layers import RMSNorm
from .layout21 import ImageBlock, JointLayout, joint_positions
from .packed_linears import forget_if_moved, packed_linears


@dataclass(frozen=True)
class DiT21Config:
    num_layers: int = 32
    num_heads: int = 32
    head_dim: int = 128
    in_channels: int = 64  # latent channels; the released model reads latents unpatched (patch size 1)
    out_channels: int = 64
    text_dim: int = 4096  # Qwen3-VL-8B hidden size
    mlp_ratio: int = 3
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    # Text and condition tokens are modulated from t = 0, which makes their keys and values cacheable.
    causal_condition: bool = True

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


def _linear(dim_in: int, dim_out: int) -> nn.Linear:
    return nn.Linear(dim_in, dim_out, bias=False)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose stored weight is `scale - 1` (zero-centred), all in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (self.weight.float() + 1)).to(x.dtype)


class TextProjection(nn.Module):
    """text_norm -> in_layer -> GELU(tanh) -> out_layer: text encoder states (B, L, text_dim) -> (B, L, D)."""

    def __init__(self, text_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCenteredRMSNorm(text_dim, eps)
        self.in_layer = _linear(text_dim, dim)
        self.out_layer = _linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = _linear(in_dim, dim)
        self.linear_2 = _linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class TimeEmbed(nn.Module):
    """sigma (B,) -> (B, D): [cos, sin] of 1000 sigma times 128 log-spaced frequencies, then the MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = TimestepEmbedder(frequency_dim, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
        # The reference rounds sigma to the compute dtype, then scales in float32 before the frequencies.
        angle = (1000.0 * timestep.to(dtype).float())[:, None] * freqs[None]
        return self.timestep_embedder(torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1).to(dtype))


class SwiGLU(nn.Module):
    """out(silu(gate_layer(x)) * proj(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = _linear(dim, hidden)
        self.gate_layer = _linear(dim, hidden)
        self.out = _linear(hidden, dim)

    def packed_up(self, x: torch.Tensor) -> torch.Tensor | None:
        """[gate_layer; proj] as one (2 * hidden, dim) weight where the gated GEMM serves x (ops/linear_swiglu.py),
        else None. Called outside compiled code (pointer checks), its result passed into the block as an input."""
        if not swiglu_fusable(x):
            return None
        packed = packed_linears(self, [self.gate_layer, self.proj])
        return None if packed is None else packed[0]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        forget_if_moved(self, [self.gate_layer, self.proj])  # a move leaves the old packed weight otherwise held
        return result

    def forward(self, x: torch.Tensor, packed_up: torch.Tensor | None = None) -> torch.Tensor:
        if packed_up is not None:  # one gated GEMM, the product in its epilogue
            return self.out(linear_swiglu(x, packed_up))
        gate, proj = self.gate_layer(x), self.proj(x)
        if hasattr(self.out, "forward_after_swiglu"):  # an FP8 linear: under W8A8 one pass quantises the product
            return self.out.forward_after_swiglu(gate, proj)
        return self.out(F.silu(gate) * proj)


class Attention21(nn.Module):
    """q/k/v projections with RMSNorm on q and k per head; `to_out.0` projects back (index 1 was dropout)."""

    # FP8 attention under FP8 compute (ops.attention.set_fp8_attention): the target pass over the cached prefix,
    # where cuDNN's FP8 kernel runs.
    fp8_attention = False

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = _linear(dim, dim), _linear(dim, dim), _linear(dim, dim)
        self.to_out = nn.ModuleList([_linear(dim, dim)])
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)

    def qkv(self, x: torch.Tensor, rotation: torch.Tensor):
        """x (B, S, D) -> query, key, value (B, S, H, head_dim); q and k normed then rotated (float32 math), in one
        fused pass on CUDA (ops/single_stream.py)."""
        return qkv_norm_rope(self.to_q(x), self.to_k(x), self.to_v(x), self.norm_q.weight, self.norm_k.weight,
                             (self.norm_q.eps, self.norm_k.eps), rotation, self.head_dim)

    def fp8_operands(self, x: torch.Tensor, rotation: torch.Tensor, prefix_key: torch.Tensor,
                     prefix_value: torch.Tensor):
        """FP8 attention's inputs for the target x (B, T, D) over [prefix; itself]: q and k leave the norm + RoPE
        pass in FP8; the cached prefix keys join k under its scale (the bound that scale stands for holds for every
        key normed by norm_k); v is quantised as it is joined. Returns float8 (B, T, H, hd) q and (B, P + T, H, hd)
        k, v, then their three descales (1, 1, 1, 1)."""
        batch = x.shape[0]
        q8, q_descale = qk_norm_rope_fp8(self.to_q(x), self.norm_q.weight, self.norm_q.eps, rotation, self.head_dim)
        k8, k_descale = qk_norm_rope_fp8(self.to_k(x), self.norm_k.weight, self.norm_k.eps, rotation, self.head_dim)
        prefix_k8 = (prefix_key.float() / k_descale).to(FP8_DTYPE).expand(batch, -1, -1, -1)
        v8, v_descale = quantize_joined([prefix_value.flatten(2).expand(batch, -1, -1), self.to_v(x)], self.head_dim)
        return q8, torch.cat([prefix_k8, k8], dim=1), v8, q_descale, k_descale, v_descale

    def attend_fp8(self, x: torch.Tensor, rotation: torch.Tensor, prefix_key: torch.Tensor,
                   prefix_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 attention (cuDNN) of the target over [prefix; itself]: the float8 output (B, T, H, hd), whose
        descale (returned too) is v's."""
        operands = self.fp8_operands(x, rotation, prefix_key, prefix_value)
        return attention_fp8(*operands), operands[-1]


@dataclass
class Modulation:
    """One row set of the shared modulation, each (B | 1, 1, D): the scales, the gates after their tanh, and a zero
    row (the fused norms' shift: 2.1 has none), all made once per forward for every block."""

    scale1: torch.Tensor
    gate1: torch.Tensor
    scale2: torch.Tensor
    gate2: torch.Tensor
    zero: torch.Tensor


class QwenImage21Block(nn.Module):
    def __init__(self, cfg: DiT21Config):
        super().__init__()
        dim = cfg.dim
        # Parameter-free LayerNorms, kept as modules so the reference's names and eps hold.
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.eps)
        self.attn = Attention21(dim, cfg.num_heads, cfg.head_dim, cfg.eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.eps)
        self.img_mlp = SwiGLU(dim, dim * cfg.mlp_ratio)

    def _fused_norms(self) -> bool:
        # One-pass norm kernels (ops/single_stream.py), except where W8A8 linears read the normalised rows inside a
        # compiled graph: there inductor fuses their FP8 quantisation into the norm (as in the 20B block). Eagerly
        # (the prefill, an uncompiled model) nothing would fuse it, and the kernel is the faster form.
        return not (getattr(self.attn.to_q, "fp8_compute", False) and torch.compiler.is_compiling())

    def normed(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """The attention's input: LayerNorm(x) * (1 + scale1), x (B, S, D)."""
        return scaled_norm(x, mod.zero, mod.scale1, self.img_norm1.eps, self._fused_norms())

    def project(self, x: torch.Tensor, mod: Modulation, rotation: torch.Tensor):
        """The attention inputs of x (B, S, D): query, key, value (B, S, H, head_dim)."""
        return self.attn.qkv(self.normed(x, mod), rotation)

    def finish(self, x: torch.Tensor, attended: torch.Tensor, mod: Modulation, descale: torch.Tensor | None = None,
               packed_up: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of the block after attention: attended (B, S, H, head_dim) -> x (B, S, D); float8 attended
        values come with their descale (FP8 attention); packed_up: the MLP's `packed_up` or None."""
        if descale is None:
            update = self.attn.to_out[0](attended.flatten(2))
        else:
            update = _linear_from_fp8(self.attn.to_out[0], attended.flatten(2), descale, x.dtype)
        x, normed = gated_residual_scaled_norm(x, update, mod.gate1, mod.zero, mod.scale2, self.img_norm2.eps,
                                               self._fused_norms())
        x = x + mod.gate2 * self.img_mlp(normed, packed_up)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x

    def forward(self, x: torch.Tensor, mod: Modulation, rotation: torch.Tensor, prefix_key=None, prefix_value=None,
                segments: list[tuple[int, int, bool]] | None = None, finish: bool = True, target: tuple | None = None,
                packed_up: torch.Tensor | None = None):
        """One block over the prefix, over the target, or over both (every use goes through here, so hooks on
        blocks, weight streaming's and FSDP2's among them, see each).

        Prefix: x (B, P, D) with its `segments`, attending block-causally within itself. Target: x (B, T, D)
        attending to [prefix_key / prefix_value (B | 1, P, H, hd); its own]. Returns (x after the block, or None
        with finish=False; this block's key and value of x, (B, S, H, hd), or None for a target under FP8
        attention: the target's are never kept).
        Both (`QwenImage21DiT.joint`): x the prefix with its `segments`, `target` the target's (x, mod, rotation);
        returns (the prefix after the block, or None with finish=False; the target after the block).
        packed_up: the MLP's gate and up weights packed (`SwiGLU.packed_up`, inference) or None.
        """
        if target is not None:
            return self._joint(x, mod, rotation, segments, finish, *target)
        if segments is None and fp8_attention_enabled(x, self.attn.fp8_attention):
            attended, descale = self.attn.attend_fp8(self.normed(x, mod), rotation, prefix_key, prefix_value)
            return self.finish(x, attended, mod, descale, packed_up), None, None
        query, key, value = self.project(x, mod, rotation)
        if not finish:
            return None, key, value
        if segments is not None:
            attended = block_causal_attention(query, key, value, segments)
        else:
            attended = prefix_attention(query, key, value, prefix_key, prefix_value)
        return self.finish(x, attended, mod, packed_up=packed_up), key, value

    def _joint(self, x: torch.Tensor, mod: Modulation, rotation: torch.Tensor, segments: list[tuple[int, int, bool]],
               finish: bool, img_x: torch.Tensor, img_mod: Modulation, img_rotation: torch.Tensor):
        """The prefix x (B | 1, P, D) and the target img_x (B, T, D) through this block: the prefill's arithmetic
        for the one, the target pass's over the prefix's keys and values for the other. The prefix's work comes
        first, as in the two passes: the backward then adds up each gradient's parts in their order, so the
        gradients are bit-equal (target first, they differ in the last bits)."""
        query, key, value = self.project(x, mod, rotation)
        if finish:
            x = self.finish(x, block_causal_attention(query, key, value, segments), mod)
        img_query, img_key, img_value = self.project(img_x, img_mod, img_rotation)
        img_x = self.finish(img_x, prefix_attention(img_query, img_key, img_value, key, value), img_mod)
        return (x if finish else None), img_x


def _linear_from_fp8(layer: nn.Module, x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype):
    if hasattr(layer, "forward_fp8_input"):  # an FP8 linear: W8A8 takes the float8 rows as they are
        return layer.forward_fp8_input(x8, descale, dtype)
    return layer((x8.float() * descale.reshape(())).to(dtype))


def block_causal_attention(query, key, value, segments: list[tuple[int, int, bool]]) -> torch.Tensor:
    """Attention within the prefix (B, P, H, hd): a span's queries see every key before it and, for an image
    block, all of its own keys; a text span's own keys causally. One unmasked call per image block."""
    outputs = []
    for start, end, is_text in segments:
        mask = None
        if is_text:
            span = end - start
            mask = torch.ones(span, end, dtype=torch.bool, device=query.device).tril(diagonal=start)[None, None]
        outputs.append(attention(query[:, start:end], key[:, :end], value[:, :end], mask=mask))
    return torch.cat(outputs, dim=1)


@dataclass
class PrefixCache:
    """Per block, the prefix's keys and values (B | 1, P, H, head_dim), post norm and RoPE.

    step_independent: modulated from t = 0 (causal_condition), so valid at every step; else only at its own.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    layout: JointLayout
    step_independent: bool
    target_rotation: torch.Tensor | None = None  # the target's (cos, sin) pairs (T, head_dim/2, 2), made once


class QwenImage21DiT(nn.Module):
    def __init__(self, cfg: DiT21Config = DiT21Config()):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.time_text_embed = TimeEmbed(dim)
        self.txt_in = TextProjection(cfg.text_dim, dim, cfg.eps)
        self.img_in = _linear(cfg.in_channels, dim)
        self.modulation = nn.Sequential(nn.SiLU(), _linear(dim, 4 * dim))  # [scale1, gate1, scale2, gate2]
        self.transformer_blocks = nn.ModuleList([QwenImage21Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.Module()  # holds `linear` under the checkpoint's name: a scale only, no shift
        self.norm_out.linear = _linear(dim, dim)
        self.proj_out = _linear(dim, cfg.out_channels)
        self.gradient_checkpointing = False
        self.checkpointed_blocks: int | None = None  # with checkpointing on: only the first N blocks (None: all)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.txt_in.text_norm.weight.dtype  # a norm weight: never stored in FP8

    def _temb(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.time_text_embed(timestep, self.compute_dtype)

    def _modulation(self, temb: torch.Tensor) -> Modulation:
        scale1, gate1, scale2, gate2 = self.modulation(temb)[:, None].chunk(4, dim=-1)
        return Modulation(scale1, gate1.tanh(), scale2, gate2.tanh(), torch.zeros_like(scale1))

    def _checkpointed(self, index: int) -> bool:
        """Whether block `index` recomputes its forward in the backward (prefix and target pass alike)."""
        limit = len(self.transformer_blocks) if self.checkpointed_blocks is None else self.checkpointed_blocks
        return self.gradient_checkpointing and torch.is_grad_enabled() and index < limit

    def rotations(self, layout: JointLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) pairs of prefix and target, (P, head_dim/2, 2) and (T, head_dim/2, 2), float32."""
        prefix, target = joint_positions(layout)
        return tuple(torch.view_as_real(rope_tables(p.to(device), self.config.axes_dim)) for p in (prefix, target))

    def embed_prefix(self, text_states: torch.Tensor, condition_tokens: torch.Tensor | None,
                     layout: JointLayout) -> torch.Tensor:
        """text_states (B, L, text_dim) with L = the layout's text tokens in order; condition_tokens (B, N, C) the
        condition images' latent tokens in order (None without any) -> the prefix (B, P, D) in sequence order."""
        dtype = self.compute_dtype
        if text_states.shape[1] != layout.num_text_tokens:
            raise ValueError(f"{text_states.shape[1]} text states for a layout of {layout.num_text_tokens} text tokens")
        text = self.txt_in(text_states.to(dtype))
        images = None if condition_tokens is None else self.img_in(condition_tokens.to(dtype))
        pieces, text_at, image_at = [], 0, 0
        for run in layout.prefix:
            if isinstance(run, ImageBlock):
                pieces.append(images[:, image_at:image_at + run.num_tokens])
                image_at += run.num_tokens
            else:
                pieces.append(text[:, text_at:text_at + run])
                text_at += run
        if images is not None and image_at != images.shape[1]:
            raise ValueError(f"{images.shape[1]} condition tokens for a layout of {image_at}")
        return torch.cat(pieces, dim=1)

    def prefill(self, text_states: torch.Tensor, condition_tokens: torch.Tensor | None, layout: JointLayout,
                timestep: torch.Tensor | None = None) -> PrefixCache:
        """Run the prefix through every block (block-causal) and keep each block's keys and values.

        timestep (B,): used only without causal_condition (the prefix is then modulated from it); with it the
        prefix is modulated from t = 0 and the cache serves every step.
        """
        x = self.embed_prefix(text_states, condition_tokens, layout)  # (B, P, D)
        mod = self._prefix_modulation(timestep, x.device)
        rotation, target_rotation = self.rotations(layout, x.device)
        segments = layout.segments()
        keys, values = [], []
        last = len(self.transformer_blocks) - 1
        checkpointed = functools.partial(torch.utils.checkpoint.checkpoint, _call_eagerly, use_reentrant=False)
        for index, block in enumerate(self.transformer_blocks):
            if self._checkpointed(index):  # training: recomputed in the backward
                x, key, value = checkpointed(block, x, mod, rotation, segments=segments, finish=index < last)
            else:  # the last block's prefix output is never read: only its keys and values are
                x, key, value = _call_eagerly(block, x, mod, rotation, segments=segments, finish=index < last,
                                              packed_up=block.img_mlp.packed_up(x))
            keys.append(key)
            values.append(value)
        return PrefixCache(keys, values, layout, self.config.causal_condition, target_rotation)

    def _prefix_modulation(self, timestep: torch.Tensor | None, device) -> Modulation:
        """The prefix's modulation: from t = 0 with causal_condition, else from the step's timestep (B,)."""
        if self.config.causal_condition or timestep is None:
            if not self.config.causal_condition:
                raise ValueError("this DiT has causal_condition=False: its prefix needs the step's timestep")
            timestep = torch.zeros(1, device=device)
        return self._modulation(self._temb(timestep))

    def _embed_target(self, target_tokens: torch.Tensor, timestep: torch.Tensor, rotation: torch.Tensor,
                      layout: JointLayout):
        """The target's input rows (B, T, D), its timestep embedding (B, D) and modulation."""
        if target_tokens.shape[1] != rotation.shape[-3]:
            raise ValueError(f"{target_tokens.shape[1]} target tokens for a {layout.target} target block")
        temb = self._temb(timestep)
        return self.img_in(target_tokens.to(self.compute_dtype)), temb, self._modulation(temb)

    def _velocity(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The output layer: the target's rows (B, T, D) after the blocks -> velocity (B, T, out_channels)."""
        scale = self.norm_out.linear(F.silu(temb))[:, None]  # (B, 1, D)
        return self.proj_out(F.layer_norm(x, x.shape[-1:], eps=self.config.eps) * (1 + scale))

    def forward(self, target_tokens: torch.Tensor, timestep: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Velocity of the target: target_tokens (B, T, C) latent tokens row-major, timestep (B,) sigma in [0, 1],
        cache: `prefill`'s (batch B or 1). Returns (B, T, out_channels)."""
        rotation = cache.target_rotation  # under sequence parallelism: this rank's target tokens' rows
        if rotation is None:
            _, rotation = self.rotations(cache.layout, target_tokens.device)
        x, temb, mod = self._embed_target(target_tokens, timestep, rotation, cache.layout)  # x (B, T, D)
        if _compiled(self.transformer_blocks[0]):
            torch._dynamo.mark_static(x, 0)  # as the 20B DiT: a new batch size compiles a graph of its own
        for index, block in enumerate(self.transformer_blocks):
            keys, values = cache.keys[index], cache.values[index]
            if self._checkpointed(index):
                x, _, _ = torch.utils.checkpoint.checkpoint(block, x, mod, rotation, keys, values, use_reentrant=False)
            else:
                x, _, _ = block(x, mod, rotation, keys, values, packed_up=block.img_mlp.packed_up(x))
        return self._velocity(x, temb)

    def joint(self, text_states: torch.Tensor, condition_tokens: torch.Tensor | None, layout: JointLayout,
              target_tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Training's pass: `prefill` then `forward`'s velocity (B, T, out_channels), with each block run ONCE over
        both the prefix and the target (prefill's inputs, then forward's; timestep (B,) also modulates a prefix
        without causal_condition).

        Why: in the two passes each block runs twice a step, so a hook on a block fires twice, and in the backward
        the autograd engine interleaves the two chains in an order that depends on the prefix's shape. FSDP2
        reduce-scatters a block's gradients from such a hook: processes whose samples differ in edit images then
        reduced in different orders (a collective mismatch). Here block k's backward is one node after block k+1's,
        whatever the prefix. The arithmetic is the two passes' (tests/test_training_qwen21.py: velocity and
        gradients equal); checkpointing recomputes the one joint call of each of the first N blocks.

        Compiled blocks (--compile) take the two passes: a graph of the joint call would be traced again for
        every prefix (its segments are Python ints), the target pass's is traced once (FSDP2 refuses --compile)."""
        if _compiled(self.transformer_blocks[0]):
            step = None if self.config.causal_condition else timestep
            return self(target_tokens, timestep, self.prefill(text_states, condition_tokens, layout, step))
        prefix = self.embed_prefix(text_states, condition_tokens, layout)  # (B | 1, P, D)
        prefix_mod = self._prefix_modulation(timestep, prefix.device)
        prefix_rotation, rotation = self.rotations(layout, prefix.device)
        segments = layout.segments()
        x, temb, mod = self._embed_target(target_tokens, timestep, rotation, layout)  # x (B, T, D)
        last = len(self.transformer_blocks) - 1
        for index, block in enumerate(self.transformer_blocks):
            # The last block's prefix output is never read: only its keys and values are.
            args = (prefix, prefix_mod, prefix_rotation)
            options = dict(segments=segments, finish=index < last, target=(x, mod, rotation))
            if self._checkpointed(index):  # recomputed in the backward, both streams
                prefix, x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **options)
            else:
                prefix, x = block(*args, **options)
        return self._velocity(x, temb)


def _compiled(block: nn.Module) -> bool:
    """Whether `block` runs compiled (nn.Module.compile, as pipe.compile() does)."""
    return getattr(block, "_compiled_call_impl", None) is not None


def _call_eagerly(block: nn.Module, *args, **kwargs):
    """block(...) with its hooks, eagerly even where the block is compiled. The prefill is the compiled blocks'
    odd one out: its structure (the text and image runs of the prefix) changes with every prompt, so a graph for it
    would recompile per prompt. It runs once per prompt (with the KV cache), where eager with the fused kernels of
    ops/ costs about 1% of a 40-step image; the target pass, what every step runs, is the compiled one.
    nn.Module.compile only changes what __call__ dispatches to; _call_impl is the eager call with its hooks."""
    return block._call_impl(*args, **kwargs)


def dit21_config_from_shapes(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None) -> DiT21Config:
    """The 2.1 DiT's size from its tensor shapes; a diffusers config.json supplies RoPE axes and causal_condition."""
    config_json = config_json or {}
    if config_json.get("patch_size", 1) != 1:
        raise ValueError(f"patch_size={config_json['patch_size']}: only the released unpatched layout (1) is supported")
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    dim, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    mlp_hidden = shapes["transformer_blocks.0.img_mlp.proj.weight"][0]
    if mlp_hidden % dim:
        raise ValueError(f"MLP width {mlp_hidden} is not a multiple of the model width {dim}")
    axes = tuple(config_json.get("axes_dims_rope", DiT21Config.axes_dim if head_dim == 128 else ()))
    if not axes:  # the released (16, 56, 56) split scaled to the head, each axis even
        frame = max(2, (head_dim * 16 // 128) // 2 * 2)
        axes = (frame, (head_dim - frame) // 2, (head_dim - frame) // 2)
    return DiT21Config(
        num_layers=num_layers, num_heads=dim // head_dim, head_dim=head_dim, in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0], text_dim=shapes["txt_in.in_layer.weight"][1],
        mlp_ratio=mlp_hidden // dim, axes_dim=axes, eps=float(config_json.get("eps", DiT21Config.eps)),
        causal_condition=bool(config_json.get("causal_condition", True)),
    )
