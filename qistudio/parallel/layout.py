"""Which image tokens a sequence rank holds: equal chunks of the padded image sequence, text replicated.

The N image tokens of a row (target first, then any condition groups) are padded at the end to chunk x P tokens
for P = ulysses x ring sequence ranks; sequence rank s holds tokens [s chunk, (s + 1) chunk). Padding sits only at
the end, so every chunk's valid tokens are a prefix of it, and a ring chunk (the ulysses ranks of one ring
position together: chunk x ulysses tokens) is valid up to `valid_in_ring_chunk`. Padded tokens are zeros; as keys
they are never attended (sliced away), as queries they are computed and dropped: any N runs on any P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    num_image: int  # N, the valid image tokens of the unsharded sequence
    ulysses: int
    ring: int
    sequence_rank: int

    @property
    def ranks(self) -> int:
        return self.ulysses * self.ring

    @property
    def chunk(self) -> int:
        """Image tokens per sequence rank (padding included)."""
        return max(1, -(-self.num_image // self.ranks))

    @property
    def padded(self) -> int:
        return self.chunk * self.ranks

    @property
    def valid_local(self) -> int:
        """Valid (not padding) image tokens of this rank's chunk: a prefix of it."""
        return min(self.chunk, max(0, self.num_image - self.sequence_rank * self.chunk))

    @property
    def ring_chunk(self) -> int:
        return self.chunk * self.ulysses

    def valid_in_ring_chunk(self, index: int) -> int:
        return min(self.ring_chunk, max(0, self.num_image - index * self.ring_chunk))

    def ring_chunk_positions(self, index: int, device) -> torch.Tensor:
        start = index * self.ring_chunk
        return torch.arange(start, start + self.ring_chunk, device=device)

    def pad(self, x: torch.Tensor, dim: int, value=0) -> torch.Tensor:
        """x with its `dim` (of size num_image) padded to `padded` with `value`."""
        extra = self.padded - x.shape[dim]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)

    def local(self, x: torch.Tensor, dim: int, value=0) -> torch.Tensor:
        """This rank's chunk of x along `dim` (the image token axis), padded as needed."""
        return self.pad(x, dim, value).narrow(dim, self.sequence_rank * self.chunk, self.chunk)
