"""Which rows of a batched DiT call a rank computes: equal shares over data x cfg, the last row repeated to fill."""

from __future__ import annotations

import torch

from ..ops.split_attention import SplitMask


class RowShare:
    """This rank's rows of a batch of `total` rows cut into `groups` equal shares (the last row repeated to fill)."""

    def __init__(self, total: int, groups: int, index: int, device):
        self.total, self.groups = total, groups
        self.per_group = -(-total // groups)
        self.indices = [min(index * self.per_group + i, total - 1) for i in range(self.per_group)]
        self.real = [index * self.per_group + i < total for i in range(self.per_group)]  # False: a repeat
        self.index_tensor = torch.tensor(self.indices, device=device)

    def take(self, x):
        """x's rows (dim 0) of this share; None and tensors broadcast over rows (dim 0 of 1) pass unchanged."""
        if x is None or self.groups == 1:
            return x
        if isinstance(x, list):
            return [x[i] for i in self.indices]
        if isinstance(x, SplitMask):
            return SplitMask(x.num_image, self.take(x.text_to_image), self.take(x.text_to_text))
        if x.shape[0] != self.total:
            return x
        return x.index_select(0, self.index_tensor.to(x.device))

    def take_table(self, table: torch.Tensor) -> torch.Tensor:
        """A RoPE table: (S, D/2) shared by the rows, or (B, S, D/2) per row."""
        return self.take(table) if table.dim() == 3 else table
