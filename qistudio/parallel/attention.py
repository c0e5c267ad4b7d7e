"""Sequence-parallel joint attention: what ops/attention's one entry runs inside a sharded DiT forward.

Design note. The DiT is unchanged: each rank runs it on its chunk of image tokens plus the whole text, so the
joint q/k/v reaching attention are [this rank's image chunk | all text] (B, n + L, H, D), with RoPE already
applied from the sliced tables. Here they become attention over the whole sequence:
- Ulysses (heads split): an all-to-all of the image q, k and v turns (B, n, H, D) on each of u ranks into
  (B, u n, H / u, D); the text needs no transfer (every rank has it), each rank takes its heads. The DiT hands
  over q, k and v one at a time as each leaves its projection, norm and RoPE (`prepare`): q's all-to-all runs
  while k is projected, k's while v is, and all three are waited for right before the attention (a DiT that
  hands them over together gets one all-to-all of the three stacked). With no ring,
  the image padding is dropped and the one-process attention runs (same kernel, key lengths and mask: EliGen's
  split attention included). Outputs go back by the inverse all-to-all; the text output's heads by an all-gather
  issued beside it.
- FP8 attention (FP8 compute, Ulysses without ring): the same path in float8 (`fp8`): q, k and v cross as bytes,
  half of bf16's, and so does the output. q's and k's scales are bounds from the norm weights (the same on every
  rank); v's is the maximum over every rank's valid tokens (`quantize_value`, one all-reduce of one number), so
  every scale is the one-process scale and the result the one-process result.
- Ring: K/V of the (Ulysses-gathered) image chunks travel around the ring (ring.py), the mask read per block.
Both together are USP: Ulysses inside the ring positions, ring across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.attention import attention, attention_fp8, attention_override
from ..ops.flex_mask import FlexMask
from ..ops.fp8 import FP8_DTYPE, FP8_MAX
from .collectives import (Pending, all_reduce_max, start_all_gather, start_heads_to_sequence,
                          start_sequence_to_heads)
from .degrees import ParallelConfigError
from .layout import TokenLayout
from .masks import JointMask
from .mesh import ParallelMesh
from .ring import ring_attention


@dataclass(frozen=True)
class Prepared:
    """One of q, k, v handed over early: its image part's all-to-all in flight, its text heads of this rank."""

    image: Pending
    text: torch.Tensor


class SequenceParallelAttention:
    """attention(query, key, value, key_lengths, mask) over sharded image tokens; one per sharded forward.

    With Ulysses it also takes q, k and v one at a time as the DiT makes them (`prepare`, ops/attention's
    attention_input): each one's all-to-all starts at once and runs while the next projection computes; all three
    are waited for right before the attention."""

    # The q/k/v all-to-alls issued as each projection finishes (False: one all-to-all after all three). On CUDA the
    # streamed form gives up the fused q/k/v norm + RoPE pass for one pass per tensor (ops/qk_norm_rope.py):
    # bench/parallel.py times both ("ours, one all-to-all" rows).
    overlap = True

    def __init__(self, mesh: ParallelMesh, layout: TokenLayout):
        self.mesh, self.layout = mesh, layout

    @property
    def takes_fp8(self) -> bool:
        """Whether FP8 attention runs here (`fp8`): under Ulysses alone; ring attention runs the compute dtype."""
        return self.layout.ring == 1

    @property
    def streams(self) -> bool:
        """Whether the DiT hands q, k, v over one at a time (read by ops/attention's attention_streams)."""
        return self.layout.ulysses > 1 and self.overlap

    def prepare(self, index: int, joint: torch.Tensor) -> Prepared:
        """q (0), k (1) or v (2) of [this rank's image chunk | all text] (B, n + L, H, D): the image part's
        all-to-all to the ranks of its heads issued now, the text's heads of this rank sliced (no transfer)."""
        n, ulysses = self.layout.chunk, self.layout.ulysses
        pending = start_sequence_to_heads(joint[:, :n], self.mesh.group("ulysses"), ulysses,
                                          f"ulysses all-to-all of {'qkv'[index]}")
        return Prepared(pending, self._text_heads(joint[:, n:]))

    def _text_heads(self, text: torch.Tensor) -> torch.Tensor:
        heads = text.shape[2] // self.layout.ulysses
        first = self.mesh.coordinate["ulysses"] * heads
        return text[:, :, first : first + heads]

    def __call__(self, query, key, value, key_lengths=None, mask=None):
        if isinstance(mask, FlexMask):  # ShardedDiT refuses this first; a mask over the local tokens is no use
            raise ParallelConfigError("a FlexAttention mask cannot be split across sequence ranks")
        image, text = self._heads(query, key, value)
        text_lengths = self._text_lengths(key_lengths)
        if self.layout.ring == 1:
            image_out, text_out = self._whole_sequence(image, text, text_lengths, mask)
        else:
            joint_mask = JointMask(mask, self.layout.num_image, text_lengths, image[0].device)
            image_out, text_out = ring_attention(torch.stack(image), text, self.layout, joint_mask,
                                                 self.mesh.group("ring"), self.mesh.coordinate["ring"])
        return self._back(image_out, text_out)

    def fp8(self, q8, k8, v8, q_descale, k_descale, v_descale, key_lengths=None):
        """ops/attention's attention_fp8 over the whole sequence: float8 q/k/v cross as bytes (half of bf16's),
        the one-process FP8 attention runs on this rank's heads, its float8 output goes back the same way. q's and
        k's scales come from the norm weights, v's from `quantize_value`: the same on every rank."""
        if not self.takes_fp8:  # ops/attention's fp8_attention_enabled asks first
            raise ParallelConfigError("FP8 attention does not run under ring attention")
        image, text = self._heads(q8, k8, v8)
        joint, key_lengths = self._joint(image, text, self._text_lengths(key_lengths))
        with attention_override(None):  # this call is the plain one
            out8 = attention_fp8(*joint, q_descale, k_descale, v_descale, key_lengths)
        return self._back(self._image_part(out8, image[0].shape[1]), out8[:, self.layout.num_image:])

    def quantize_value(self, parts: list[torch.Tensor], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[image chunk (B, n, D), text (B, L, D)] of v as float8 (B, n + L, H, head_dim) and its descale, scaled
        by the absolute maximum over every rank's valid tokens and rows: the one-process scale, exactly (a
        maximum, in any order; padding tokens left out, repeated padding rows change nothing)."""
        image, text = parts
        valid = [part.abs().amax() for part in (image[:, : self.layout.valid_local], text) if part.numel()]
        amax = all_reduce_max(torch.stack(valid).amax().float().reshape(1), "FP8 attention value scale")
        scale = FP8_MAX / amax.clamp(min=1e-12)
        joined = torch.cat(parts, dim=1).unflatten(-1, (-1, head_dim))
        return (joined.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), (1.0 / scale).reshape(1, 1, 1, 1)

    def _text_lengths(self, key_lengths):
        # key_lengths counted this rank's n image tokens; the text part of each is what matters.
        return None if key_lengths is None else [count - self.layout.chunk for count in key_lengths]

    def _heads(self, query, key, value):
        """(image, text): q, k, v of every image token (B, u n, H / u, D) and of the text (B, L, H / u, D), in the
        heads of this rank."""
        n, ulysses = self.layout.chunk, self.layout.ulysses
        if isinstance(query, Prepared):  # streamed: the three all-to-alls are in flight; wait for them here
            image = tuple(part.image.result() for part in (query, key, value))  # each (B, u n, H / u, D)
            return image, (query.text, key.text, value.text)
        if ulysses > 1:
            stacked = torch.stack([query[:, :n], key[:, :n], value[:, :n]])  # (3, B, n, H, D): one all-to-all
            image = tuple(start_sequence_to_heads(stacked, self.mesh.group("ulysses"), ulysses).result())
            return image, tuple(self._text_heads(t[:, n:]) for t in (query, key, value))
        return (query[:, :n], key[:, :n], value[:, :n]), (query[:, n:], key[:, n:], value[:, n:])

    def _back(self, image_out: torch.Tensor, text_out: torch.Tensor) -> torch.Tensor:
        """[this rank's image chunk | all text] (B, n + L, H, D) of the outputs of this rank's heads."""
        ulysses = self.layout.ulysses
        if ulysses > 1:
            group = self.mesh.group("ulysses")
            # Both issued before either is waited for: the text heads' gather runs beside the image all-to-all.
            image_back = start_heads_to_sequence(image_out, group, ulysses)  # (B, n, H, D)
            text_back = start_all_gather(text_out, group, "ulysses text heads gather")  # (u, B, L, H / u, D)
            image_out, text_out = image_back.result(), text_back.result().movedim(0, 2).flatten(2, 3)
        return torch.cat([image_out, text_out], dim=1)

    def _joint(self, image, text, text_lengths):
        """[every image token (padding dropped) | text] of q, k, v, and their key lengths."""
        num_image = self.layout.num_image
        joint = [torch.cat([part[:, :num_image], text_part], dim=1) for part, text_part in zip(image, text)]
        return joint, None if text_lengths is None else [num_image + count for count in text_lengths]

    def _image_part(self, out: torch.Tensor, tokens: int) -> torch.Tensor:
        """The image rows of a whole-sequence output, padded back to the `tokens` this rank's heads cover."""
        image = out[:, : self.layout.num_image]
        if image.dtype == FP8_DTYPE:  # padded as bytes: zeros either way
            return self.layout.pad(image.view(torch.uint8), dim=1)[:, :tokens].view(FP8_DTYPE)
        return self.layout.pad(image, dim=1)[:, :tokens]

    def _whole_sequence(self, image, text, text_lengths, mask):
        """Attention over every image token (padding dropped) and the text: the one-process call."""
        joint, key_lengths = self._joint(image, text, text_lengths)
        with attention_override(None):  # this call is the plain one
            out = attention(*joint, key_lengths=key_lengths, mask=mask)
        return self._image_part(out, image[0].shape[1]), out[:, self.layout.num_image:]
