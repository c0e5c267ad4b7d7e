"""What one LoRA file changes in one layer: a low-rank pair, LoHa, LoKr or a dense delta.

Each update can give its change as a full weight (and bias) delta in float32, for fusing and for export, and as
the change of the layer's output for an input, for the unfused path. Only the low-rank pair has a cheaper forward
than "multiply by the full delta": `scale * (x @ A^T) @ B^T` costs rank * (in + out) per token instead of in * out.

Every delta here is already multiplied by the file's own scale (alpha / rank where the file stores an alpha); the
user's scale (`load_lora(alpha=...)`, `set_lora_scale`) multiplies on top, at use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _file_scale(alpha: float | None, rank: int) -> float:
    # LoRA trainers scale B @ A by alpha / rank in the forward; a file without an alpha was trained at alpha = rank.
    return 1.0 if alpha is None else alpha / rank


def _product_problem(left_name: str, left: torch.Tensor, right_name: str, right: torch.Tensor) -> str | None:
    if left.shape[1] != right.shape[0]:
        return f"{left_name} {list(left.shape)} and {right_name} {list(right.shape)} have different ranks"
    return None


class Update:
    """Base class. `tensors` holds the file's tensors under their part names (for export); `alpha` the file's."""

    kind = "update"
    alpha: float | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...] | None:
        """The shape of the weight delta, without computing it (None: this update leaves the weight alone)."""
        raise NotImplementedError

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return None

    def weight_delta(self) -> torch.Tensor | None:
        """The full weight delta, float32, on the update's device."""
        raise NotImplementedError

    def inner_problem(self) -> str | None:
        """Why the update's own factors do not multiply together (ranks that differ), or None."""
        return None

    def bias_delta(self) -> torch.Tensor | None:
        return None

    def output_delta(self, x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """How much `scale` times this update changes a linear layer's output for input x, computed in `dtype`."""
        weight = self.weight_delta()
        bias = self.bias_delta()
        weight = None if weight is None else (weight * scale).to(x.device, dtype)
        bias = None if bias is None else (bias * scale).to(x.device, dtype)
        if weight is None:
            return bias.expand(*x.shape[:-1], bias.shape[0])
        return F.linear(x.to(dtype), weight, bias)

    def to(self, device, dtype: torch.dtype | None) -> "Update":
        """The same update with its tensors on `device` in `dtype` (None: as they are); alpha stays a float."""
        moved = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in self.tensors.items()}
        return type(self)(**moved, alpha=self.alpha)


@dataclass
class LowRank(Update):
    """W += scale * up @ down: the classic LoRA (lora_A/lora_B, lora_down/lora_up)."""

    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float | None = None
    kind = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return _file_scale(self.alpha, self.rank)

    @property
    def tensors(self):
        return {"down": self.down, "up": self.up}

    @property
    def weight_shape(self):
        return (self.up.shape[0], self.down.shape[1])

    def weight_delta(self):
        return (self.up.float() @ self.down.float()) * self.scale

    def inner_problem(self):
        return _product_problem("lora_B", self.up, "lora_A", self.down)

    def output_delta(self, x, dtype, scale):
        down = self.down.to(x.device, dtype)
        up = self.up.to(x.device, dtype)
        # Scale the rank-sized hidden state: the cheapest place to multiply.
        return F.linear(F.linear(x.to(dtype), down) * (scale * self.scale), up)


@dataclass
class LoHa(Update):
    """LyCORIS LoHa: W += scale * (w1_a @ w1_b) * (w2_a @ w2_b) (element-wise product of two low-rank products)."""

    w1_a: torch.Tensor  # (out, rank)
    w1_b: torch.Tensor  # (rank, in)
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None = None
    kind = "loha"

    @property
    def tensors(self):
        return {"w1_a": self.w1_a, "w1_b": self.w1_b, "w2_a": self.w2_a, "w2_b": self.w2_b}

    @property
    def weight_shape(self):
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def inner_problem(self):
        problem = (_product_problem("hada_w1_a", self.w1_a, "hada_w1_b", self.w1_b)
                   or _product_problem("hada_w2_a", self.w2_a, "hada_w2_b", self.w2_b))
        second = (self.w2_a.shape[0], self.w2_b.shape[1])
        if problem is None and self.weight_shape != second:
            problem = f"hada_w1 gives {list(self.weight_shape)}, hada_w2 {list(second)}"
        return problem

    def weight_delta(self):
        first = self.w1_a.float() @ self.w1_b.float()
        second = self.w2_a.float() @ self.w2_b.float()
        # The rank is w1_b's leading size, as LyCORIS and ComfyUI read it.
        return first * second * _file_scale(self.alpha, self.w1_b.shape[0])


@dataclass
class LoKr(Update):
    """LyCORIS LoKr: W += scale * kron(w1, w2), each factor stored whole or as a low-rank pair (w*_a @ w*_b)."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    alpha: float | None = None
    kind = "lokr"

    @property
    def tensors(self):
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _factor_shape(self, whole, a, b) -> tuple[int, int]:
        return tuple(whole.shape) if whole is not None else (a.shape[0], b.shape[1])

    @property
    def weight_shape(self):
        rows1, cols1 = self._factor_shape(self.w1, self.w1_a, self.w1_b)
        rows2, cols2 = self._factor_shape(self.w2, self.w2_a, self.w2_b)
        return (rows1 * rows2, cols1 * cols2)

    @property
    def scale(self) -> float:
        # As LyCORIS and ComfyUI: alpha / rank of the decomposed factor (w2's when both are); no decomposition,
        # no scaling (LyCORIS sets alpha = rank then).
        if self.w2 is None:
            return _file_scale(self.alpha, self.w2_b.shape[0])
        if self.w1 is None:
            return _file_scale(self.alpha, self.w1_b.shape[0])
        return 1.0

    def inner_problem(self):
        if self.w1 is None and (problem := _product_problem("lokr_w1_a", self.w1_a, "lokr_w1_b", self.w1_b)):
            return problem
        if self.w2 is None:
            return _product_problem("lokr_w2_a", self.w2_a, "lokr_w2_b", self.w2_b)
        return None

    def weight_delta(self):
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2.float() if self.w2 is not None else self.w2_a.float() @ self.w2_b.float()
        return torch.kron(w1, w2) * self.scale


@dataclass
class Dense(Update):
    """A full delta stored as is: `.diff` (added to the weight) and `.diff_b` (added to the bias)."""

    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    alpha: float | None = None  # never stored with a dense delta; kept for the common interface
    kind = "dense"

    @property
    def tensors(self):
        return {k: v for k, v in (("diff", self.diff), ("diff_b", self.diff_b)) if v is not None}

    @property
    def weight_shape(self):
        return None if self.diff is None else tuple(self.diff.shape)

    @property
    def bias_shape(self):
        return None if self.diff_b is None else tuple(self.diff_b.shape)

    def weight_delta(self):
        return None if self.diff is None else self.diff.float()

    def bias_delta(self):
        return None if self.diff_b is None else self.diff_b.float()
