"""Structured joint attention without a dense S x S mask: the fast kernel on the image block, the rest merged in.

Design note. EliGen's mask over [image | text] is dense where it matters (every image token sees every image
token) and structured only where text is involved (a few hundred tokens). Handing SDPA a dense boolean mask
forces its slow masked kernel on all S^2 scores. Instead, for image queries the softmax is split in two key sets:
the image keys, through the fused kernel that also returns each row's log-sum-exp, and the text keys with their
mask, computed directly (N x L scores, L small). Two partial softmaxes with their log-sum-exps combine exactly:
out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b). Text queries (few) attend to everything with their
mask through ordinary masked SDPA. The result equals dense masked attention up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SplitMask:
    """Who may attend to whom in [image (num_image) | text] when image tokens all see each other.

    text_to_image: (B, L, num_image) bool, symmetric use: text token t and image token i see each other.
    text_to_text: (B, L, L) bool. Padding rows and columns are False throughout.
    """

    num_image: int
    text_to_image: torch.Tensor
    text_to_text: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The (B, 1, S, S) boolean mask this stands for (tests and reference only)."""
        batch, length, num_image = self.text_to_image.shape
        image = torch.ones(batch, num_image, num_image, dtype=torch.bool, device=self.text_to_image.device)
        top = torch.cat([image, self.text_to_image.transpose(1, 2)], dim=2)
        bottom = torch.cat([self.text_to_image, self.text_to_text], dim=2)
        return torch.cat([top, bottom], dim=1)[:, None]


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (B, H, S, D) tensors (optional additive bias (B, 1, S_q, S_k)) and its (B, H, S_q) float32
    log-sum-exp (natural log of the scaled scores' exp-sum; -inf for a row that sees nothing)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if bias is None:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        else:
            bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # per head, as it wants
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
        lse = lse[..., 0] if lse.dim() == 4 else lse  # cuDNN: (B, H, S, 1); efficient: (B, H, S rounded up)
        return out, lse[:, :, : q.shape[2]].float()
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (weights @ v.float()).to(q.dtype), lse


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Combine two partial softmax attentions over disjoint key sets by their log-sum-exps."""
    total = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - total)[..., None]
    weight_b = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - total), 0.0)[..., None]
    return (out_a.float() * weight_a + torch.nan_to_num(out_b.float()) * weight_b).to(out_a.dtype)


def split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SplitMask) -> torch.Tensor:
    """Attention of (B, S, H, D) tensors under `mask`, as dense masked attention would give it."""
    if torch.compiler.is_compiling():
        # The fused kernels' log-sum-exp entry points do not trace; a compiled block takes the dense mask.
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)), attn_mask=mask.dense())
        return out.transpose(1, 2)
    n = mask.num_image
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
    q_image = q[:, :, :n]
    # Image queries: image keys through the fused kernel, text keys (few) with their mask; merged exactly.
    out_a, lse_a = _attention_with_lse(q_image, k[:, :, :n], v[:, :, :n])
    allowed = mask.text_to_image.transpose(1, 2)[:, None]  # (B, 1, N, L)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device).masked_fill_(~allowed, float("-inf"))
    out_b, lse_b = _attention_with_lse(q_image, k[:, :, n:], v[:, :, n:], bias)
    image_out = _merge(out_a, lse_a, out_b, lse_b)
    # Text queries: everything, with their mask (image columns, then text columns).
    text_mask = torch.cat([mask.text_to_image, mask.text_to_text], dim=2)[:, None]  # (B, 1, L, S)
    # A padding row sees nothing: let it see itself so softmax stays finite; its output is never used.
    text_mask = text_mask | ~text_mask.any(dim=-1, keepdim=True)
    text_out = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=text_mask)
    return torch.cat([image_out, text_out], dim=2).transpose(1, 2)
