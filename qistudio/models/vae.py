"""The Qwen-Image VAE (Wan-2.1-style causal 3D VAE), specialised to single images.

Design note. The checkpoint is a video VAE: every conv is a causal Conv3d that pads time with 2*p zero frames in
front only. For one image (T = 1) the padded input is [0, 0, x], so a kernel of temporal size 3 only ever
multiplies x by its LAST time slice: `conv3d(pad(x), W) == conv2d(x, W[:, :, -1])`. The temporal resamplers
(`time_conv`) never touch a first frame in the reference either: `downsample3d` only fills its (empty) feature cache
and `upsample3d` marks it "Rep" and skips. So for images we run every CausalConv3d as a 2D conv on the weight's
last time slice and never call `time_conv`. Parameters keep their 5D checkpoint shapes and names, so a
diffusers / DiffSynth state dict loads strictly with no key map; activations are 4D (B, C, H, W) throughout, which
is faster and leaner than the 3D reference. Equality with diffusers' `AutoencoderKLQwenImage` is tested.

`decode` does not clamp (DiffSynth's VAE does not either; its image conversion clips). diffusers' untiled
`decode` clamps to [-1, 1], its tiled one does not. Clamp where the image is made.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from qistudio.ops.attention import attention

QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the VAE plus the latent normalisation; defaults are Qwen-Image's."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # which levels own a time_conv (weights only)
    image_channels: int = 3  # 4 for RGBA (Qwen-Image-Layered)
    latents_mean: tuple[float, ...] = QWEN_IMAGE_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE_LATENTS_STD
    norm_eps: float = 1e-12  # F.normalize's default, as in the reference

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} flags, "
                f"got {self.temporal_downsample}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values but z_dim is {self.z_dim}; pass {self.z_dim} values"
                )

    @property
    def spatial_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for Qwen-Image)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_shapes(
        cls,
        shapes: dict[str, tuple[int, ...]],
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
    ) -> VAEConfig:
        """Infer the config from a checkpoint's tensor names and shapes (no weights needed).

        Latent statistics are not in the weights: pass them, else Qwen-Image's are used when z_dim is 16 and
        zeros/ones otherwise.
        """
        for key in ("encoder.conv_in.weight", "post_quant_conv.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"):
            if key not in shapes:
                raise ValueError(f"not a Qwen-Image VAE checkpoint: tensor {key!r} is missing")
        base_dim, image_channels = shapes["encoder.conv_in.weight"][:2]
        z_dim = shapes["post_quant_conv.weight"][0]
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up_blocks."))
        num_res_blocks = -1 + len({k.split(".")[4] for k in shapes if k.startswith("decoder.up_blocks.0.resnets.")})
        # Decoder level i outputs base_dim * dim_mult[::-1][i] channels.
        out_dims = [shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
        dim_mult = tuple(d // base_dim for d in reversed(out_dims))
        # Encoder level i ends with its resampler at flat index (i + 1) * (num_res_blocks + 1) - 1.
        temporal = tuple(
            f"encoder.down_blocks.{(i + 1) * (num_res_blocks + 1) - 1}.time_conv.weight" in shapes
            for i in range(levels - 1)
        )
        if latents_mean is None:
            latents_mean = QWEN_IMAGE_LATENTS_MEAN if z_dim == 16 else (0.0,) * z_dim
        if latents_std is None:
            latents_std = QWEN_IMAGE_LATENTS_STD if z_dim == 16 else (1.0,) * z_dim
        return cls(
            base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
            temporal_downsample=temporal, image_channels=image_channels,
            latents_mean=tuple(latents_mean), latents_std=tuple(latents_std),
        )  # fmt: skip

    @classmethod
    def from_diffusers_config(cls, config: dict) -> VAEConfig:
        """From the `config.json` that diffusers saves beside `AutoencoderKLQwenImage` weights."""
        if config.get("attn_scales"):
            raise ValueError(f"attn_scales={config['attn_scales']} is not supported; Qwen-Image uses []")
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(
            base_dim=config.get("base_dim", defaults["base_dim"]),
            z_dim=config.get("z_dim", defaults["z_dim"]),
            dim_mult=tuple(config.get("dim_mult", defaults["dim_mult"])),
            num_res_blocks=config.get("num_res_blocks", defaults["num_res_blocks"]),
            temporal_downsample=tuple(config.get("temperal_downsample", defaults["temporal_downsample"])),
            image_channels=config.get("input_channels", defaults["image_channels"]),
            latents_mean=tuple(config.get("latents_mean", defaults["latents_mean"])),
            latents_std=tuple(config.get("latents_std", defaults["latents_std"])),
        )


class CausalConv3d(nn.Conv3d):
    """A checkpoint Conv3d run as a 2D conv on its last time slice: exact for T = 1 (see the design note)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.padding[1:])


class RMSNorm(nn.Module):
    """Unit L2 norm over channels times sqrt(C) times gamma; gamma is (C, 1, 1, 1), or (C, 1, 1) in attention."""

    def __init__(self, dim: int, eps: float, images: bool = False):
        super().__init__()
        self.eps = eps
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        normed = F.normalize(x.float(), dim=1, eps=self.eps).to(x.dtype)  # statistic in float32
        return normed * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1) shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm1 = RMSNorm(in_dim, eps)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, eps)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(x)))
        hidden = self.conv2(F.silu(self.norm2(hidden)))  # dropout is 0 in every Qwen-Image VAE
        return self.conv_shortcut(x) + hidden


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each image, with a residual."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, 3C)
        query, key, value = qkv.unsqueeze(2).chunk(3, dim=-1)  # each (B, H*W, 1 head, C)
        out = attention(query, key, value).squeeze(2)  # (B, H*W, C)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj(out)


class Resample(nn.Module):
    """2x spatial down- or up-sampling; `resample.1` is the conv. `time_conv` is loaded, never run on images."""

    def __init__(self, dim: int, mode: str, temporal: bool):
        super().__init__()
        if mode == "down":  # pad right/bottom by one, 3x3 stride 2: (H, W) -> (H/2, W/2)
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:  # nearest-exact x2 then 3x3 conv halving the width: (dim, H, W) -> (dim/2, 2H, 2W)
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
            if temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, eps), ResidualBlock(dim, dim, eps)])
        self.attentions = nn.ModuleList([AttentionBlock(dim, eps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """Image (B, C_img, H, W) -> mean and log-variance (B, 2 z_dim, H/f, W/f) before quant_conv."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.image_channels, dims[0], 3, padding=1)
        # A flat list, as in the checkpoint: num_res_blocks resnets per level, then a resampler except at the last.
        self.down_blocks = nn.ModuleList()
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, cfg.norm_eps))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                self.down_blocks.append(Resample(out_dim, "down", cfg.temporal_downsample[level]))
        self.mid_block = MidBlock(dims[-1], cfg.norm_eps)
        self.norm_out = RMSNorm(dims[-1], cfg.norm_eps)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class UpBlock(nn.Module):
    """num_res_blocks + 1 resnets, then (except at the last level) an upsampler that halves the width."""

    def __init__(self, in_dim: int, out_dim: int, cfg: VAEConfig, upsample: bool, temporal: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * (cfg.num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(a, b, cfg.norm_eps) for a, b in zip(dims[:-1], dims[1:]))
        self.upsamplers = nn.ModuleList([Resample(out_dim, "up", temporal)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    """Latents (B, z_dim, h, w) after post_quant_conv -> image (B, C_img, f h, f w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mults = cfg.dim_mult[::-1]
        dims = [cfg.base_dim * m for m in (mults[0], *mults)]
        temporal = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.norm_eps)
        self.up_blocks = nn.ModuleList()
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim if level == 0 else in_dim // 2  # the previous upsampler halved the width
            upsample = level < len(mults) - 1
            self.up_blocks.append(UpBlock(in_dim, out_dim, cfg, upsample, upsample and temporal[level]))
        self.norm_out = RMSNorm(dims[-1], cfg.norm_eps)
        self.conv_out = CausalConv3d(dims[-1], cfg.image_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got {value!r}")
    return pair


def _tile_spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Tile [start, end) spans every `stride`, skipping a start once the previous tile reached the border."""
    return [
        (start, min(start + size, length))
        for start in range(0, length, stride)
        if not (start >= stride and start - stride + size >= length)
    ]


def _ramp(length: int, border: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1D blend weights: 1 inside, (1..b)/b over `border` pixels at each edge that is not an image border."""
    weights = torch.ones(length)
    if border == 0:
        return weights
    ramp = torch.arange(1, border + 1, dtype=torch.float32) / border
    if ramp_start:
        weights[:border] = torch.minimum(weights[:border], ramp[:length])
    if ramp_end:
        weights[-border:] = torch.minimum(weights[-border:], ramp.flip(0)[-length:])
    return weights


def _tiled(fn, x: torch.Tensor, size: tuple[int, int], stride: tuple[int, int], scale_in: int, scale_out: int,
           share=None, channels: int = 0):
    """DiffSynth's tiled scheme: run `fn` per tile and blend the outputs with linear-ramp masks.

    Tiles are measured in latent pixels: latent pixel i covers input [i scale_in, (i+1) scale_in) and output
    [i scale_out, (i+1) scale_out). Where two ramps would overlap (stride < size / 2) we take their minimum.
    share (index, count, reduce): several processes split the tiles (tile k runs where k % count == index);
    reduce sums their float32 canvases of `channels` channels, None where the result is not kept.
    """
    height, width = x.shape[-2] // scale_in, x.shape[-1] // scale_in  # in latent pixels
    border = [(s - t) * scale_out for s, t in zip(size, stride)]
    values = weight = None
    if share is not None:  # a process may run no tile: its canvas exists anyway
        values = x.new_zeros(x.shape[0], channels, height * scale_out, width * scale_out, dtype=torch.float32)
        weight = torch.zeros(values.shape[-2:], device=x.device)
    tiles = [(top, bottom, left, right) for top, bottom in _tile_spans(height, size[0], stride[0])
             for left, right in _tile_spans(width, size[1], stride[1])]
    for index, (top, bottom, left, right) in enumerate(tiles):
        rows = _ramp((bottom - top) * scale_out, border[0], top > 0, bottom < height)
        cols = _ramp((right - left) * scale_out, border[1], left > 0, right < width)
        mask = torch.minimum(rows[:, None], cols[None, :]).to(x.device)  # (tile_h, tile_w)
        region = (..., slice(top * scale_out, bottom * scale_out), slice(left * scale_out, right * scale_out))
        if share is None or index % share.count == share.index:
            tile = fn(x[..., top * scale_in : bottom * scale_in, left * scale_in : right * scale_in])
            if values is None:  # accumulate in float32 whatever the compute dtype
                values = tile.new_zeros(*tile.shape[:2], height * scale_out, width * scale_out, dtype=torch.float32)
                weight = torch.zeros(values.shape[-2:], device=tile.device)
            values[region] += tile.float() * mask
        weight[region] += mask
    if share is not None:
        values = share.reduce(values)
        if values is None:
            return None
    return (values / weight).to(x.dtype)


class QwenImageVAE(nn.Module):
    """Images in [-1, 1] <-> normalised latents; attribute names are the checkpoint's tensor names."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # From the config at call time, so the module holds no buffers (meta-built models need no re-init).
        mean, std = (
            torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            for v in (self.config.latents_mean, self.config.latents_std)
        )
        return mean, std

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(images))  # (B, 2 z, h, w): mean then log-variance
        latents = moments[:, : self.config.z_dim]  # the posterior mean; no sampling
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(latents)
        return self.decoder(self.post_quant_conv(latents * std + mean))

    def encode(
        self, images: torch.Tensor, tiled: bool = False, tile_size: int | tuple = 128, tile_stride: int | tuple = 64
    ) -> torch.Tensor:
        """(B, C_img, H, W) in [-1, 1] -> normalised latents (B, z_dim, H/8, W/8). Tile sizes in latent pixels."""
        factor = self.config.spatial_factor
        if images.ndim != 4 or images.shape[1] != self.config.image_channels:
            raise ValueError(f"images must be (B, {self.config.image_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {factor} on both sides")
        images = images.to(self.quant_conv.weight.dtype)
        if not tiled:
            return self._encode(images)
        size, stride = self._tile_args(tile_size, tile_stride)
        return _tiled(self._encode, images, size, stride, scale_in=factor, scale_out=1)

    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int | tuple = 128, tile_stride: int | tuple = 64,
        share=None,
    ) -> torch.Tensor | None:
        """Normalised latents (B, z_dim, h, w) -> images (B, C_img, 8h, 8w), about [-1, 1], not clamped.
        share: tiles split across processes (see _tiled; tiled only); None returned where not kept."""
        if latents.ndim != 4 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be (B, {self.config.z_dim}, h, w), got {tuple(latents.shape)}")
        latents = latents.to(self.post_quant_conv.weight.dtype)
        if not tiled:
            return self._decode(latents)
        size, stride = self._tile_args(tile_size, tile_stride)
        return _tiled(self._decode, latents, size, stride, scale_in=1, scale_out=self.config.spatial_factor,
                      share=share, channels=self.config.image_channels)

    @staticmethod
    def _tile_args(tile_size, tile_stride) -> tuple[tuple[int, int], tuple[int, int]]:
        size, stride = _pair(tile_size, "tile_size"), _pair(tile_stride, "tile_stride")
        if stride[0] > size[0] or stride[1] > size[1]:
            raise ValueError(f"tile_stride {tile_stride!r} must not exceed tile_size {tile_size!r} (latent pixels)")
        return size, stride
