"""Who may attend to whom, read block by block: the one-process attention mask as ring attention needs it.

The DiT's mask (or text padding) describes the whole joint sequence [image (N) | text (L)]; ring attention meets it
one (query block, key block) pair at a time: image queries of this rank against the image keys of one ring chunk,
against the text keys, and the same for the text queries. `JointMask.allowed` answers for one such pair with a
(B, 1, q, k) bool block, or None when everything is allowed (the image x image blocks of every layout but mixed
edit rows, so the large blocks never build a mask).
"""

from __future__ import annotations

import torch

from ..ops.split_attention import SplitMask

IMAGE, TEXT = "image", "text"


class JointMask:
    """mask: None, a SplitMask (EliGen) or a bool (B|1, 1, 1|S, S) mask over the unsharded joint sequence;
    text_lengths: per row, the valid text keys (None: all, or the mask says)."""

    def __init__(self, mask, num_image: int, text_lengths: list[int] | None, device):
        if mask is not None and not isinstance(mask, (SplitMask, torch.Tensor)):
            raise TypeError(f"sequence-parallel attention takes a SplitMask or a bool mask, not {type(mask).__name__}")
        self.mask, self.num_image = mask, num_image
        self.lengths = None if text_lengths is None else list(text_lengths)  # Python ints: no device sync, traced
        self.text_lengths = None if text_lengths is None else torch.tensor(text_lengths, device=device)

    def allowed(self, query_part: str, query_index: torch.Tensor, key_part: str, key_index: torch.Tensor):
        """(B|1, 1, len(query_index), len(key_index)) bool, or None for all allowed. Indices count within their
        part (image positions 0..N-1, text positions 0..L-1); query positions past the end are clamped (padding
        queries are computed and thrown away)."""
        block = None
        if key_part == TEXT and self.text_lengths is not None:
            valid = key_index[None, :] < self.text_lengths[:, None]  # (B, k)
            block = valid[:, None, None, :]
        structure = self._structure(query_part, query_index, key_part, key_index)
        if structure is not None:
            block = structure if block is None else block & structure
        return block

    def _structure(self, query_part, query_index, key_part, key_index):
        mask = self.mask
        if mask is None:
            return None
        if isinstance(mask, torch.Tensor):  # (B|1, 1, 1|S, S), joint positions
            rows = self._joint(query_part, query_index) if mask.shape[2] > 1 else torch.zeros(1, dtype=torch.long,
                                                                                                device=mask.device)
            return mask[:, :, rows][..., self._joint(key_part, key_index)]
        n = mask.num_image
        query_index = query_index.clamp(max=(n if query_part == IMAGE else mask.text_to_text.shape[1]) - 1)
        if query_part == IMAGE and key_part == IMAGE:
            return None  # every image token sees every image token
        if query_part == IMAGE:  # image queries, text keys: text_to_image read transposed
            return mask.text_to_image[:, key_index][:, :, query_index].transpose(1, 2)[:, None]
        if key_part == IMAGE:
            return mask.text_to_image[:, query_index][:, :, key_index][:, None]
        return mask.text_to_text[:, query_index][:, :, key_index][:, None]

    def _joint(self, part: str, index: torch.Tensor) -> torch.Tensor:
        if part == IMAGE:
            return index.clamp(max=self.num_image - 1)
        return index + self.num_image
