"""3-axis rotary position tables (frame, height, width) for image grids and text, as Qwen-Image builds them.

Each token carries a 3-D position. Image tokens of group `frame` on an h x w patch grid get height positions
-(h - h//2) .. h//2 - 1 (centred, "scale_rope") and the same for width. Text tokens sit on the diagonal
(p, p, p) starting just past the largest image half-extent, so text never collides with image positions.
Angles are computed directly from positions in float32 (no precomputed table, hence no length limit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AXES_DIM = (16, 56, 56)
THETA = 10000.0


@dataclass(frozen=True)
class ImageGrid:
    """One group of image tokens: its RoPE frame index and its patch-grid size (latent size / 2)."""

    frame: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


def _centred(n: int, device=None) -> torch.Tensor:
    # -(n - n//2) .. -1 followed by 0 .. n//2 - 1, in that order (the reference concatenates negative then positive)
    return torch.cat([torch.arange(-(n - n // 2), 0, device=device), torch.arange(0, n // 2, device=device)])


def image_positions(grid: ImageGrid, device=None) -> torch.Tensor:
    """(h*w, 3) float positions of one image group, row-major over the patch grid."""
    rows = _centred(grid.height, device).float()
    cols = _centred(grid.width, device).float()
    frame = torch.full((grid.height, grid.width), float(grid.frame), device=device)
    return torch.stack(
        [frame, rows[:, None].expand(-1, grid.width), cols[None, :].expand(grid.height, -1)], dim=-1
    ).reshape(-1, 3)


def resampled_image_positions(grid: ImageGrid, target: ImageGrid, device=None) -> torch.Tensor:
    """Positions of an image group whose spatial phases are sampled from the target grid (Lowres-Fix).

    A low-resolution edit image then spans the same spatial extent as the target; its frame stays its own.
    """
    rows = _centred(target.height, device)[torch.linspace(0, target.height - 1, grid.height).long()].float()
    cols = _centred(target.width, device)[torch.linspace(0, target.width - 1, grid.width).long()].float()
    frame = torch.full((grid.height, grid.width), float(grid.frame), device=device)
    return torch.stack(
        [frame, rows[:, None].expand(-1, grid.width), cols[None, :].expand(grid.height, -1)], dim=-1
    ).reshape(-1, 3)


def text_offset(grids: list[ImageGrid]) -> int:
    """First text position: the largest half-extent over all image groups."""
    return max(max(g.height // 2, g.width // 2) for g in grids)


def text_positions(offset: int, length: int, device=None) -> torch.Tensor:
    """(length, 3) positions on the diagonal starting at `offset`."""
    p = torch.arange(offset, offset + length, device=device).float()
    return p[:, None].expand(-1, 3)


def rope_tables(
    positions: torch.Tensor, axes_dim: tuple[int, ...] = AXES_DIM, theta: float = THETA
) -> torch.Tensor:
    """(S, 3) positions -> (S, sum(axes_dim)/2) complex64 unit phasors, one per interleaved pair."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
        angles.append(positions[:, axis, None].float() * freqs[None, :])
    angle = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: torch.Tensor, phasors: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, S, H, D) by unit phasors; float32 math.

    phasors: (S, D/2) shared by the batch, or (B, S, D/2) when rows have different layouts (batched edits).
    One complex multiply. The model itself rotates with `apply_rotation` (real arithmetic: compiled, it fuses with
    the q/k norm; complex tensors cannot) or the fused kernel of ops/qk_norm_rope.py.
    """
    phasors = phasors[None] if phasors.dim() == 2 else phasors
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, S, H, D/2)
    return torch.view_as_real(pairs * phasors[:, :, None, :]).flatten(-2).to(x.dtype)


def apply_rotation(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """apply_rope with the phasors as real (cos, sin) pairs: rotation (B, S, D/2, 2) or (S, D/2, 2), float32."""
    rotation = (rotation[None] if rotation.dim() == 3 else rotation)[:, :, None]  # (B, S, 1, D/2, 2)
    cos, sin = rotation[..., 0], rotation[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).to(x.dtype)


@dataclass
class Rotary:
    """Phasors of the image tokens (all groups, in sequence order) and of the text tokens.

    Each is (S, D/2) for a batch that shares one layout, or (B, S, D/2) with one table per row. `joint` is
    [image; text] along the sequence as real (cos, sin) pairs, (S, D/2, 2) or (B, S, D/2, 2) float32, built once
    per forward (`with_joint`) for the blocks' joint q/k path: a real tensor, because complex inputs do not pass
    through compiled graphs into kernels intact.
    """

    image: torch.Tensor
    text: torch.Tensor
    joint: torch.Tensor | None = None

    def with_joint(self) -> "Rotary":
        if self.joint is not None:
            return self
        image, text = self.image, self.text
        if image.dim() != text.dim():  # one table per row on one side only (EliGen's text segments)
            batch = image.shape[0] if image.dim() == 3 else text.shape[0]
            image, text = (t if t.dim() == 3 else t.expand(batch, *t.shape) for t in (image, text))
        return Rotary(self.image, self.text, torch.view_as_real(torch.cat([image, text], dim=-2)).clone())


def layer_rotary(layers: list[ImageGrid], condition: ImageGrid, text_length: int, device=None,
                 axes_dim: tuple[int, ...] = AXES_DIM) -> Rotary:
    """Qwen-Image-Layered's layer-3D RoPE over [layer groups..., input image] then text.

    The frame axis counts layers: the generated groups take frames 0, 1, ... (their `frame`), the input image
    frame -1; the text starts past the largest half-extent and past the number of layer groups.
    """
    grids = [*layers, condition]
    image = rope_tables(torch.cat([image_positions(grid, device) for grid in grids]), axes_dim)
    offset = max(text_offset(grids), len(layers))
    return Rotary(image, rope_tables(text_positions(offset, text_length, device), axes_dim))


def qwen_rotary(
    grids: list[ImageGrid],
    text_length: int,
    device=None,
    axes_dim: tuple[int, ...] = AXES_DIM,
    image_positions_list: list[torch.Tensor] | None = None,
) -> Rotary:
    """The rotary tables of a Qwen-Image sequence: image groups in order, then `text_length` text tokens."""
    if image_positions_list is None:
        image_positions_list = [image_positions(g, device) for g in grids]
    image = rope_tables(torch.cat(image_positions_list), axes_dim)
    text = rope_tables(text_positions(text_offset(grids), text_length, device), axes_dim)
    return Rotary(image, text)
