"""Sequence-parallel joint attention: what ops/attention's one entry runs inside a sharded DiT forward.

Design note. The DiT is unchanged: each rank runs it on its chunk of image tokens plus the whole text, so the
joint q/k/v reaching attention are [this rank's image chunk | all text] (B, n + L, H, D), with RoPE already
applied from the sliced tables. Here they become attention over the whole sequence:
- Ulysses (heads split): one all-to-all of the stacked image q/k/v turns (B, n, H, D) on each of u ranks into
  (B, u n, H / u, D); the text needs no transfer (every rank has it), each rank takes its heads. With no ring,
  the image padding is dropped and the one-process attention runs (same kernel, key lengths and mask: EliGen's
  split attention included). Outputs go back by the inverse all-to-all; the text output's heads by an all-gather.
- Ring: K/V of the (Ulysses-gathered) image chunks travel around the ring (ring.py), the mask read per block.
Both together are USP: Ulysses inside the ring positions, ring across them.
"""

from __future__ import annotations

import torch

from ..ops.attention import attention, attention_override
from ..ops.flex_mask import FlexMask
from .collectives import all_gather, heads_to_sequence, sequence_to_heads
from .degrees import ParallelConfigError
from .layout import TokenLayout
from .masks import JointMask
from .mesh import ParallelMesh
from .ring import ring_attention


class SequenceParallelAttention:
    """attention(query, key, value, key_lengths, mask) over sharded image tokens; one per sharded forward."""

    def __init__(self, mesh: ParallelMesh, layout: TokenLayout):
        self.mesh, self.layout = mesh, layout

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_lengths=None, mask=None):
        if isinstance(mask, FlexMask):  # ShardedDiT refuses this first; a mask over the local tokens is no use
            raise ParallelConfigError("a FlexAttention mask cannot be split across sequence ranks")
        n, ulysses = self.layout.chunk, self.layout.ulysses
        # key_lengths counted this rank's n image tokens; the text part of each is what matters.
        text_lengths = None if key_lengths is None else [count - n for count in key_lengths]
        image = torch.stack([query[:, :n], key[:, :n], value[:, :n]])  # (3, B, n, H, D)
        text = (query[:, n:], key[:, n:], value[:, n:])
        if ulysses > 1:
            group = self.mesh.group("ulysses")
            image = sequence_to_heads(image, group, ulysses)  # (3, B, u n, H / u, D)
            heads = query.shape[2] // ulysses
            first = self.mesh.coordinate["ulysses"] * heads
            text = tuple(t[:, :, first : first + heads] for t in text)
        if self.layout.ring == 1:
            image_out, text_out = self._whole_sequence(image, text, text_lengths, mask)
        else:
            joint_mask = JointMask(mask, self.layout.num_image, text_lengths, query.device)
            image_out, text_out = ring_attention(image, text, self.layout, joint_mask, self.mesh.group("ring"),
                                                 self.mesh.coordinate["ring"])
        if ulysses > 1:
            group = self.mesh.group("ulysses")
            image_out = heads_to_sequence(image_out, group, ulysses)  # (B, n, H, D)
            gathered = all_gather(text_out, group, "ulysses text heads gather")  # (u, B, L, H / u, D)
            text_out = gathered.movedim(0, 2).flatten(2, 3)
        return torch.cat([image_out, text_out], dim=1)

    def _whole_sequence(self, image, text, text_lengths, mask):
        """Attention over every image token (padding dropped) and the text: the one-process call."""
        num_image = self.layout.num_image
        joint = [torch.cat([part[:, :num_image], text_part], dim=1) for part, text_part in zip(image, text)]
        key_lengths = None if text_lengths is None else [num_image + count for count in text_lengths]
        with attention_override(None):  # this call is the plain one
            out = attention(*joint, key_lengths=key_lengths, mask=mask)
        image_out = self.layout.pad(out[:, :num_image], dim=1)[:, : image.shape[2]]
        return image_out, out[:, num_image:]
