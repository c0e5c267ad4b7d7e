"""The Qwen-Image MMDiT: dual-stream (image, text) transformer blocks with joint attention.

Module names follow the official diffusers checkpoint (`transformer_blocks.N.attn.to_q`, `img_mod.1`, ...), so
that layout loads by identity. The forward is a visible loop over blocks with one hook point after each block
(ControlNet residuals). The model takes tokens, not latents: patchify, RoPE tables and feature assembly happen
outside (ops/, conditioning/), so one forward serves text-to-image, edit and every control variant.

Shapes: B batch, N image tokens (target first, then any condition groups), L text tokens (right-padded),
D = heads * head_dim model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.ada_norm import gated_residual_norm, modulated_norm
from ..ops.attention import (attention, attention_fp8, attention_fp8_value, attention_input, attention_streams,
                             fp8_attention_enabled)
from ..ops.flex_mask import flex_mask
from ..ops.qk_norm_rope import joint_qk_norm_rope_fp8, joint_qk_norm_rope_reference, joint_qkv_norm_rope
from ..ops.rope import Rotary
from .layers import FeedForward, RMSNorm, TimeTextEmbed
from .packed_linears import forget_if_moved, packed_linears


@dataclass(frozen=True)
class DiTConfig:
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    text_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    # Edit-2511: condition tokens are modulated with the t=0 embedding. A default for the pipeline, which may
    # override it per call; the weights are the same either way.
    zero_cond_t: bool = False
    # Qwen-Image-Layered: a learned row added to the timestep embedding (time_text_embed.addition_t_embedding), and
    # RoPE whose frame axis counts layers (built outside the model: ops/rope.py layer_rotary).
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


class JointAttention(nn.Module):
    """Attention over [image, text] with separate projections per stream and RMSNorm on q and k per head."""

    # FP8 attention under FP8 compute (ops.attention.set_fp8_attention); used where cuDNN's FP8 kernel runs.
    fp8_attention = False

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    @property
    def text_projections(self) -> list[nn.Linear]:
        return [self.add_q_proj, self.add_k_proj, self.add_v_proj]

    def packed_text_qkv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The text q/k/v linears as one (weight, bias) where they can run as one GEMM (models/packed_linears.py)."""
        return packed_linears(self, self.text_projections)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        forget_if_moved(self, self.text_projections)  # a move leaves the old packed weight otherwise held
        return result

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rotary: Rotary, key_lengths, mask, txt_qkv=None):
        """txt_qkv: `packed_text_qkv()`'s (weight, bias), passed in by the caller (a compiled block takes it as an
        input, not a lookup it would have to guard), or None for the three linears."""
        rotation = rotary.with_joint().joint  # (N + L, head_dim / 2, 2), or per row (B, N + L, head_dim / 2, 2)
        if mask is None and fp8_attention_enabled(img, self.fp8_attention):
            return self._forward_fp8(img, txt, rotation, key_lengths)
        if txt_qkv is None:
            txt_q, txt_k, txt_v = self.add_q_proj(txt), self.add_k_proj(txt), self.add_v_proj(txt)
        else:
            txt_q, txt_k, txt_v = F.linear(txt, *txt_qkv).chunk(3, dim=-1)  # each (B, L, D), rows 3 D apart
        if attention_streams():  # sequence parallelism: each of q, k, v leaves for the other ranks once made
            query, key, value = self._streamed_qkv(img, (txt_q, txt_k, txt_v), rotation)
        else:
            # Joined before the norms (one fused pass for q, k and v on CUDA, ops/qk_norm_rope.py), not after
            # RoPE: the same values.
            query, key, value = joint_qkv_norm_rope(
                (self.to_q(img), self.to_k(img), self.to_v(img)), (txt_q, txt_k, txt_v),
                (self.norm_q.weight, self.norm_added_q.weight), (self.norm_k.weight, self.norm_added_k.weight),
                (self.norm_q.eps, self.norm_k.eps), rotation, self.head_dim,
            )

        out = attention(query, key, value, key_lengths=key_lengths, mask=mask).flatten(2)  # (B, N + L, D)
        num_img = img.shape[1]
        if _project_all_rows(out, num_img):
            return self.to_out[0](out)[:, :num_img], self.to_add_out(out[:, num_img:])
        return self.to_out[0](out[:, :num_img]), self.to_add_out(out[:, num_img:])

    def _streamed_qkv(self, img, txt_qkv, rotation):
        """q, then k, then v, each handed to the attention (ops/attention's attention_input) as soon as it is
        made, in the values joint_qkv_norm_rope makes."""
        txt_q, txt_k, txt_v = txt_qkv
        query = attention_input(0, joint_qk_norm_rope_reference(self.to_q(img), txt_q, self.norm_q.weight,
                                                                self.norm_added_q.weight, self.norm_q.eps,
                                                                rotation, self.head_dim))
        key = attention_input(1, joint_qk_norm_rope_reference(self.to_k(img), txt_k, self.norm_k.weight,
                                                              self.norm_added_k.weight, self.norm_k.eps, rotation,
                                                              self.head_dim))
        value = attention_input(2, torch.cat([self.to_v(img), txt_v], dim=1).unflatten(-1, (-1, self.head_dim)))
        return query, key, value

    def _forward_fp8(self, img, txt, rotation, key_lengths):
        """FP8 attention (the "cudnn_fp8" backend): q and k leave the norm + RoPE pass in FP8, v is quantised as
        it is joined, and the output reaches the projections in FP8 (W8A8 linears take it without a round trip)."""
        q8, q_descale = joint_qk_norm_rope_fp8(self.to_q(img), self.add_q_proj(txt), self.norm_q.weight,
                                               self.norm_added_q.weight, self.norm_q.eps, rotation, self.head_dim)
        q8 = attention_input(0, q8)  # under Ulysses each leaves for the other ranks at once, in FP8
        k8, k_descale = joint_qk_norm_rope_fp8(self.to_k(img), self.add_k_proj(txt), self.norm_k.weight,
                                               self.norm_added_k.weight, self.norm_k.eps, rotation, self.head_dim)
        k8 = attention_input(1, k8)
        v8, v_descale = attention_fp8_value([self.to_v(img), self.add_v_proj(txt)], self.head_dim)
        v8 = attention_input(2, v8)
        out8 = attention_fp8(q8, k8, v8, q_descale, k_descale, v_descale, key_lengths).flatten(2)  # (B, N + L, D)
        num_img = img.shape[1]
        txt_out = _linear_from_fp8(self.to_add_out, out8[:, num_img:], v_descale, img.dtype)
        if _project_all_rows(out8, num_img):
            return _linear_from_fp8(self.to_out[0], out8, v_descale, img.dtype)[:, :num_img], txt_out
        return _linear_from_fp8(self.to_out[0], out8[:, :num_img], v_descale, img.dtype), txt_out


def _project_all_rows(joint: torch.Tensor, num_img: int) -> bool:
    """Whether the image output projection should run over every joint row, then keep the image rows. In a batch
    the image rows are not one matrix (each sample's text rows lie between), so projecting them alone costs a copy
    (or a batched GEMM whose bias is a pass of its own); all rows are one GEMM, bias in its epilogue, at L / (N + L)
    more of its work: worth it while the text is short."""
    return joint.shape[0] > 1 and (joint.shape[1] - num_img) * 8 <= num_img


def _linear_from_fp8(layer: nn.Module, x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype):
    if hasattr(layer, "forward_fp8_input"):  # an FP8 linear
        return layer.forward_fp8_input(x8, descale, dtype)
    return layer((x8.float() * descale.reshape(())).to(dtype))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, cfg.num_heads, cfg.head_dim, cfg.eps)
        self.img_mlp = FeedForward(dim, cfg.mlp_hidden)
        self.txt_mlp = FeedForward(dim, cfg.mlp_hidden)

    def forward(self, img, txt, img_temb, txt_temb, rotary: Rotary, key_lengths=None, mask=None,
                img_pending=None, defer_residual: bool = False, txt_qkv=None):
        """img (B, N, D), txt (B, L, D); img_temb (B, 1|N, D) (per token for zero-cond-t), txt_temb (B, 1, D).
        Returns (img, txt). txt_qkv: the attention's packed text q/k/v (JointAttention.packed_text_qkv) or None.

        The image stream's last residual can be handed on instead of added (inference, QwenImageDiT's loop):
        with defer_residual=True this returns (img, txt, pending), img lacking `gate * update` for pending =
        (update, gate); the next block takes it as img_pending and adds it inside its first norm, one pass over
        the rows fewer per block.
        """
        # Each modulation vector is [shift, scale, gate] for attention, then the same for the MLP.
        img_mod = self.img_mod(img_temb).chunk(6, dim=-1)
        txt_mod = self.txt_mod(txt_temb).chunk(6, dim=-1)
        # One-pass norm kernels (ops/ada_norm.py), except where W8A8 linears read the normalised rows: there the
        # compiled graph fuses their FP8 quantisation into the norm.
        fused = not getattr(self.attn.to_q, "fp8_compute", False)
        if img_pending is None:
            img_normed = modulated_norm(img, img_mod[0], img_mod[1], self.eps, fused)
        else:
            img, img_normed = gated_residual_norm(img, *img_pending, img_mod[0], img_mod[1], self.eps, fused)

        img_attn, txt_attn = self.attn(
            img_normed,
            modulated_norm(txt, txt_mod[0], txt_mod[1], self.eps, fused),
            rotary,
            key_lengths,
            mask,
            txt_qkv,
        )
        img, img_normed = gated_residual_norm(img, img_attn, img_mod[2], img_mod[3], img_mod[4], self.eps, fused)
        txt, txt_normed = gated_residual_norm(txt, txt_attn, txt_mod[2], txt_mod[3], txt_mod[4], self.eps, fused)
        img_update = self.img_mlp(img_normed)
        txt = txt + txt_mod[5] * self.txt_mlp(txt_normed)
        if defer_residual:
            return img, txt, (img_update, img_mod[5])
        return img + img_mod[5] * img_update, txt


class AdaNormOut(nn.Module):
    """Final adaptive LayerNorm; its linear emits (scale, shift) in that order."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return _modulate(F.layer_norm(x, x.shape[-1:], eps=self.eps), shift, scale)


# Called after each block with (block index, image tokens); returns the image tokens to continue with.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


class BlockGate(Protocol):
    """Decides between blocks what runs (step caching, qistudio/caching). Boundary i lies before block i; boundary
    num_layers after the last. Where `watches(i)`, the gate gets the streams (img, txt) at boundary i and returns
    the streams to continue with; block i runs only if `runs(i)`."""

    def watches(self, boundary: int) -> bool: ...

    def __call__(self, boundary: int, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def runs(self, index: int) -> bool: ...


class QwenImageDiT(nn.Module):
    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        self.config = cfg
        self.time_text_embed = TimeTextEmbed(cfg.dim)
        if cfg.use_additional_t_cond:  # under the checkpoint's name, beside the timestep MLP
            self.time_text_embed.addition_t_embedding = nn.Embedding(2, cfg.dim)
        self.txt_norm = RMSNorm(cfg.text_dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels, cfg.dim)
        self.txt_in = nn.Linear(cfg.text_dim, cfg.dim)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = AdaNormOut(cfg.dim, cfg.eps)
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels)
        self.gradient_checkpointing = False
        # With checkpointing on: how many blocks (the first ones) recompute their forward in the backward; None:
        # all. Blocks past it keep their activations: less recompute where memory allows (training's choice).
        self.checkpointed_blocks: int | None = None

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        timestep: torch.Tensor,
        rotary: Rotary,
        text_lengths: list[int] | None = None,
        num_target_tokens: int | None = None,
        condition_token_mask: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        block_hook: BlockHook | None = None,
        block_gate: BlockGate | None = None,
    ) -> torch.Tensor:
        """Velocity of the target image tokens.

        image_tokens (B, N, in_channels): target tokens first, then condition groups (edit, context).
        text_states (B, L, text_dim): text encoder states, right-padded; text_lengths[i] valid tokens of row i.
        timestep (B,): sigma in [0, 1].
        condition_token_mask (N,) bool: tokens modulated with the t=0 embedding (Edit-2511 zero_cond_t).
        additional_t_cond (B,) long: the row of addition_t_embedding added to the timestep embedding (Layered DiTs
            only; default row 0, the one both reference pipelines use).
        attention_mask over [image, text]: a SplitMask (EliGen's structure) or a (B, 1, 1, N+L) bool key mask (rows
            with different condition layouts); else None.
        block_gate: skips blocks (step caching); block_hook does not run after a skipped block.
        Returns (B, num_target_tokens, out_channels).
        """
        num_img = image_tokens.shape[1]
        num_target = num_img if num_target_tokens is None else num_target_tokens
        # Norm weights are never stored in FP8, so they carry the compute dtype.
        dtype = self.txt_norm.weight.dtype
        img = self.img_in(image_tokens.to(dtype))
        txt = self.txt_in(self.txt_norm(text_states.to(dtype)))

        temb = self._timestep_embedding(timestep, img.dtype, additional_t_cond)  # (B, D)
        txt_temb = temb[:, None]
        if condition_token_mask is None:
            img_temb = txt_temb
        else:
            zero_temb = self._timestep_embedding(torch.zeros_like(timestep), img.dtype, additional_t_cond)
            img_temb = torch.where(condition_token_mask[None, :, None], zero_temb[:, None], temb[:, None])

        rotary = rotary.with_joint()  # once per forward, not per block
        key_lengths = None
        if text_lengths is not None:
            key_lengths = [num_img + n for n in text_lengths]

        if attention_mask is not None and _compiled(self.transformer_blocks[0]) and not torch.is_grad_enabled():
            # Compiled blocks take masks as FlexAttention block masks (ops/flex_mask.py), built once for all blocks:
            # the split attention eager blocks use does not trace, and a dense mask runs SDPA's slow masked kernel.
            # Inference only: training (compiled with graph breaks allowed) keeps the dense mask, whose backward
            # is SDPA's own.
            attention_mask = flex_mask(attention_mask, img.shape[1] + txt.shape[1])
        if _compiled(self.transformer_blocks[0]):
            _static_batch(img, txt, img_temb, txt_temb)
        checkpointed = len(self.transformer_blocks) if self.checkpointed_blocks is None else self.checkpointed_blocks
        # Inference without hooks between blocks hands each block's last image residual to the next block's norm.
        defer = block_hook is None and not torch.is_grad_enabled()
        pending = None
        for index, block in enumerate(self.transformer_blocks):
            if block_gate is not None:
                img, txt, pending = _at_boundary(block_gate, index, img, txt, pending)
                if not block_gate.runs(index):
                    continue  # a deferred residual stays pending across skipped blocks: they add nothing
            if self.gradient_checkpointing and torch.is_grad_enabled() and index < checkpointed:
                img, txt = torch.utils.checkpoint.checkpoint(
                    block, img, txt, img_temb, txt_temb, rotary, key_lengths, attention_mask, use_reentrant=False
                )
            elif defer:
                if pending is not None:
                    _static_batch(*pending)
                img, txt, pending = block(img, txt, img_temb, txt_temb, rotary, key_lengths, attention_mask,
                                          img_pending=pending, defer_residual=True,
                                          txt_qkv=block.attn.packed_text_qkv())
            else:
                img, txt = block(img, txt, img_temb, txt_temb, rotary, key_lengths, attention_mask,
                                 txt_qkv=block.attn.packed_text_qkv())
            if block_hook is not None:
                img = block_hook(index, img)
        if pending is not None:
            update, gate = pending
            img = img + gate * update
        if block_gate is not None:
            img, txt, _ = _at_boundary(block_gate, len(self.transformer_blocks), img, txt, None)

        img = self.norm_out(img[:, :num_target], txt_temb)
        return self.proj_out(img)

    def _timestep_embedding(self, timestep: torch.Tensor, dtype: torch.dtype, additional_t_cond=None) -> torch.Tensor:
        """(B, D): the sinusoidal MLP embedding of sigma, plus a Layered DiT's learned row (cast to `dtype`)."""
        temb = self.time_text_embed(timestep, dtype)
        if not self.config.use_additional_t_cond:
            return temb
        if additional_t_cond is None:
            additional_t_cond = torch.zeros(timestep.shape[0], dtype=torch.long, device=timestep.device)
        return temb + self.time_text_embed.addition_t_embedding(additional_t_cond).to(dtype)


def _at_boundary(gate: BlockGate, boundary: int, img, txt, pending):
    """Hand the streams to `gate` where it watches, with a deferred image residual added first."""
    if not gate.watches(boundary):
        return img, txt, pending
    if pending is not None:
        update, scale = pending
        img = img + scale * update
    img, txt = gate(boundary, img, txt)
    return img, txt, None


def _static_batch(*tensors: torch.Tensor) -> None:
    """Keep the batch size a constant of the compiled blocks. After a second batch size (guidance off then on,
    another num_images) torch.compile would otherwise recompile them for any batch size, and such a process ran
    slower: 1328x1328 batch 2 with FP8 compute took 0.304 s after a batch-1 call, 0.294-0.298 s in processes that
    only ran batch 2 (H200; bench/RESULTS.md, sixth pass). A new batch size now compiles once more, as a new image
    size does."""
    for tensor in tensors:
        torch._dynamo.mark_static(tensor, 0)


def _compiled(block: nn.Module) -> bool:
    """Whether `block` runs compiled (nn.Module.compile, as compile_repeated_blocks does)."""
    return getattr(block, "_compiled_call_impl", None) is not None


def rope_axes_dim(head_dim: int, config_json: dict | None = None) -> tuple[int, int, int]:
    """The RoPE split of a head: a diffusers config.json's `axes_dims_rope`, else the real (16, 56, 56) scaled."""
    if config_json and "axes_dims_rope" in config_json:
        return tuple(config_json["axes_dims_rope"])
    if head_dim == 128:
        return DiTConfig.axes_dim
    # Scale the real (16, 56, 56) split to the head size, keeping each axis even.
    frame = max(2, (head_dim * 16 // 128) // 2 * 2)
    return (frame, (head_dim - frame) // 2, (head_dim - frame) // 2)


def block_sizes_from_shapes(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None) -> dict:
    """The sizes any stack of DiT blocks reveals in its tensor shapes (the DiT's, an InstantX ControlNet's)."""
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    dim, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    mlp_hidden = shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0]
    return dict(num_layers=num_layers, num_heads=dim // head_dim, head_dim=head_dim, in_channels=in_channels,
                text_dim=shapes["txt_in.weight"][1], mlp_ratio=mlp_hidden / dim,
                axes_dim=rope_axes_dim(head_dim, config_json))


def dit_config_from_shapes(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None) -> DiTConfig:
    """Infer the DiT's size from its tensor shapes; a diffusers config.json, when given, supplies the RoPE axes."""
    return DiTConfig(
        **block_sizes_from_shapes(shapes, config_json),
        out_channels=shapes["proj_out.weight"][0],
        zero_cond_t=bool((config_json or {}).get("zero_cond_t", False)),
        # Only Qwen-Image-Layered has the embedding, so it also tells the RoPE when no config.json says.
        use_additional_t_cond="time_text_embed.addition_t_embedding.weight" in shapes,
        use_layer3d_rope=bool((config_json or {}).get("use_layer3d_rope",
                                                      "time_text_embed.addition_t_embedding.weight" in shapes)),
    )
