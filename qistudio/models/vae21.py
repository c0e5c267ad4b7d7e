"""The Qwen-Image 2.1 VAE (diffusers' AutoencoderKLQwenImage21): RGBA images <-> 64-channel latents at 1/16 scale.

Design note. It is Wan-2.2's residual video VAE specialised to images by its authors: every "causal" conv is
already a Conv2d (4D weights), and each level adds a parameter-free shortcut, an average over a space-to-channel
reshuffle going down and a channel-to-space duplication going up. For one image (T = 1) the temporal parts
reduce to fixed arithmetic, which is what we run:
- a temporal `time_conv` is never applied to a first frame (the reference only fills its feature cache), so it
  is loaded and never called, as in models/vae.py;
- the down shortcut of a temporal level pads one zero frame in front before averaging, so it averages the real
  values with as many zeros (`_average_down`);
- the up shortcut of a temporal level keeps the second of its two duplicated frames (the reference's first-chunk
  rule), i.e. one copy (`_duplicate_up`).
RMSNorm, the mid-block attention and the tiling are models/vae.py's. Latents are normalised with the per-channel
statistics of the config; `decode` clamps to [-1, 1] as the reference's does. Equality with diffusers is tested.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import vae
from .vae import QwenImageVAE, RMSNorm, _tiled


# The released model's per-channel latent statistics (diffusers' AutoencoderKLQwenImage21 defaults).
QWEN_IMAGE_21_LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722,
    1.8873, -1.7177, -0.651, 0.2732, 0.7562, -0.6163, -1.0277, 3.8363,
    2.021, 0.0472, 0.932, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
    -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376,
    -1.0914, -1.9435, -0.2784, -1.368, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.096, -1.326, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505,
    0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
)  # fmt: skip
QWEN_IMAGE_21_LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.791,
    3.0785, 3.65, 3.9308, 3.0904, 2.8778, 3.7675, 3.732, 5.0756,
    3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.283, 3.5694, 4.2467,
    3.9037, 3.2947, 5.077, 3.5075, 3.27, 3.4767, 2.8063, 5.1125,
    3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.055, 5.5614, 4.2963, 4.408, 3.4959,
    3.8747, 3.7608, 3.5735, 3.149, 3.7662, 3.6746, 3.4563, 3.8161,
)  # fmt: skip


@dataclass(frozen=True)
class VAE21Config:
    base_dim: int = 96
    decoder_base_dim: int = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True, True)
    image_channels: int = 4  # RGBA in and out
    latents_mean: tuple[float, ...] = QWEN_IMAGE_21_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE_21_LATENTS_STD
    norm_eps: float = 1e-12  # F.normalize's default, as in the reference

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} flags, got {self.temporal_downsample}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values but z_dim is {self.z_dim}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> VAE21Config:
        """From the config.json diffusers saves beside AutoencoderKLQwenImage21 weights."""
        if config.get("attn_scales"):
            raise ValueError(f"attn_scales={config['attn_scales']} is not supported; Qwen-Image 2.1 uses []")
        if not config.get("is_residual", True) or config.get("patch_size") not in (None, 1):
            raise ValueError("only the residual, unpatched layout of Qwen-Image 2.1's VAE is supported")
        defaults = {f.name: f.default for f in fields(cls)}
        z_dim = config.get("z_dim", defaults["z_dim"])
        base_dim = config.get("base_dim", defaults["base_dim"])
        return cls(
            base_dim=base_dim, decoder_base_dim=config.get("decoder_base_dim") or base_dim, z_dim=z_dim,
            dim_mult=tuple(config.get("dim_mult", defaults["dim_mult"])),
            num_res_blocks=config.get("num_res_blocks", defaults["num_res_blocks"]),
            temporal_downsample=tuple(config.get("temperal_downsample", defaults["temporal_downsample"])),
            image_channels=config.get("in_channels", defaults["image_channels"]),
            latents_mean=tuple(config.get("latents_mean", defaults["latents_mean"])),
            latents_std=tuple(config.get("latents_std", defaults["latents_std"])),
        )

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> VAE21Config:
        """The architecture from tensor shapes. Latent statistics are not in the weights: the released model's at
        z_dim 64, else 0 / 1 (a config.json beside the weights has the real ones)."""
        base_dim, image_channels = shapes["encoder.conv_in.weight"][:2]
        z_dim = shapes["post_quant_conv.weight"][0]
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks."))
        num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
        dim_mult = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] // base_dim
                         for i in range(levels))
        temporal = tuple(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in shapes for i in range(levels - 1))
        decoder_base_dim = shapes["decoder.conv_in.weight"][0] // dim_mult[-1]
        return cls(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, dim_mult=dim_mult,
                   num_res_blocks=num_res_blocks, temporal_downsample=temporal, image_channels=image_channels,
                   latents_mean=QWEN_IMAGE_21_LATENTS_MEAN if z_dim == 64 else (0.0,) * z_dim,
                   latents_std=QWEN_IMAGE_21_LATENTS_STD if z_dim == 64 else (1.0,) * z_dim)


def _average_down(x: torch.Tensor, out_channels: int, temporal: bool, spatial: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, out, H/s, W/s): space (and the zero-padded time step) to channels, then group means."""
    batch, channels, height, width = x.shape
    s = 2 if spatial else 1
    x = x.reshape(batch, channels, height // s, s, width // s, s).permute(0, 1, 3, 5, 2, 4)  # (B, C, s, s, h, w)
    if temporal:  # the reference pads one zero frame in front: channel c*8 + t*4 + ..., t = 0 all zeros
        x = torch.stack([torch.zeros_like(x), x], dim=2)
    x = x.reshape(batch, out_channels, -1, height // s, width // s)
    return x.mean(dim=2)


def _duplicate_up(x: torch.Tensor, out_channels: int, temporal: bool) -> torch.Tensor:
    """(B, C, h, w) -> (B, out, 2h, 2w): channels repeated, then to space; of a temporal pair, the second frame."""
    batch, channels, height, width = x.shape
    factor_t = 2 if temporal else 1
    x = x.repeat_interleave(out_channels * factor_t * 4 // channels, dim=1)
    x = x.reshape(batch, out_channels, factor_t, 2, 2, height, width)[:, :, -1]  # (B, out, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(batch, out_channels, height * 2, width * 2)


class ResidualBlock(vae.ResidualBlock):
    """models/vae.py's residual block with 2D convolutions (2.1 stores 4D weights); the same forward."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__(in_dim, out_dim, eps)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()


class Resample(nn.Module):
    """2x down (pad right/bottom, 3x3 stride 2) or up (nearest-exact, 3x3); `time_conv` loaded, never run."""

    def __init__(self, dim: int, mode: str, temporal: bool):
        super().__init__()
        if mode == "down":
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = nn.Conv2d(dim, dim, 1)
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim, 3, padding=1))
            if temporal:
                self.time_conv = nn.Conv2d(dim, dim * 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.resample[0], nn.Upsample):  # the reference upsamples in float32
            return self.resample[1](self.resample[0](x.float()).to(x.dtype))
        return self.resample(x)


class MidBlock(vae.MidBlock):
    """models/vae.py's resnet -> attention -> resnet with this file's resnets."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, eps), ResidualBlock(dim, dim, eps)])


class DownBlock(nn.Module):
    """num_res_blocks resnets, then (except at the last level) a downsampler; plus the averaged shortcut."""

    def __init__(self, in_dim: int, out_dim: int, cfg: VAE21Config, down: bool, temporal: bool):
        super().__init__()
        self.out_dim, self.down, self.temporal = out_dim, down, temporal
        dims = [in_dim] + [out_dim] * cfg.num_res_blocks
        self.resnets = nn.ModuleList(ResidualBlock(a, b, cfg.norm_eps) for a, b in zip(dims[:-1], dims[1:]))
        self.downsampler = Resample(out_dim, "down", temporal) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _average_down(x, self.out_dim, self.temporal, self.down)
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return x + shortcut


class UpBlock(nn.Module):
    """num_res_blocks + 1 resnets, then (except at the last level) an upsampler; plus the duplicated shortcut."""

    def __init__(self, in_dim: int, out_dim: int, cfg: VAE21Config, up: bool, temporal: bool):
        super().__init__()
        self.out_dim, self.up, self.temporal = out_dim, up, temporal
        dims = [in_dim] + [out_dim] * (cfg.num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(a, b, cfg.norm_eps) for a, b in zip(dims[:-1], dims[1:]))
        self.upsampler = Resample(out_dim, "up", temporal) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _duplicate_up(x, self.out_dim, self.temporal) if self.up else None
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is None:
            return x
        return self.upsampler(x) + shortcut


class Encoder(nn.Module):
    """Image (B, C_img, H, W) -> moments (B, 2 z_dim, H/16, W/16) before quant_conv."""

    def __init__(self, cfg: VAE21Config):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(a, b, cfg, level != last, level != last and cfg.temporal_downsample[level])
            for level, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.mid_block = MidBlock(dims[-1], cfg.norm_eps)
        self.norm_out = RMSNorm(dims[-1], cfg.norm_eps)
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents (B, z_dim, h, w) after post_quant_conv -> image (B, C_img, 16 h, 16 w)."""

    def __init__(self, cfg: VAE21Config):
        super().__init__()
        mults = cfg.dim_mult[::-1]
        dims = [cfg.decoder_base_dim * m for m in (mults[0], *mults)]
        temporal = cfg.temporal_downsample[::-1]
        last = len(mults) - 1
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.norm_eps)
        self.up_blocks = nn.ModuleList(
            UpBlock(a, b, cfg, level != last, level != last and temporal[level])
            for level, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.norm_out = RMSNorm(dims[-1], cfg.norm_eps)
        self.conv_out = nn.Conv2d(dims[-1], cfg.image_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenImage21VAE(nn.Module):
    """Images in [-1, 1] <-> normalised latents; attribute names are the checkpoint's tensor names."""

    def __init__(self, config: VAE21Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
                     for v in (self.config.latents_mean, self.config.latents_std))

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.quant_conv(self.encoder(images))[:, : self.config.z_dim]  # the posterior mean
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(latents)
        return self.decoder(self.post_quant_conv(latents * std + mean))

    def encode(self, images: torch.Tensor, tiled: bool = False, tile_size: int | tuple = 16,
               tile_stride: int | tuple = 12) -> torch.Tensor:
        """(B, C_img, H, W) in [-1, 1] -> normalised latents (B, z_dim, H/16, W/16). Tiles in latent pixels."""
        factor = self.config.spatial_factor
        if images.ndim != 4 or images.shape[1] != self.config.image_channels:
            raise ValueError(f"images must be (B, {self.config.image_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {factor} on both sides")
        images = images.to(self.quant_conv.weight.dtype)
        if not tiled:
            return self._encode(images)
        size, stride = QwenImageVAE._tile_args(tile_size, tile_stride)
        return _tiled(self._encode, images, size, stride, scale_in=factor, scale_out=1)

    def decode(self, latents: torch.Tensor, tiled: bool = False, tile_size: int | tuple = 16,
               tile_stride: int | tuple = 12) -> torch.Tensor:
        """Normalised latents (B, z_dim, h, w) -> images (B, C_img, 16 h, 16 w) clamped to [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be (B, {self.config.z_dim}, h, w), got {tuple(latents.shape)}")
        latents = latents.to(self.post_quant_conv.weight.dtype)
        if not tiled:
            return self._decode(latents).clamp(-1, 1)
        size, stride = QwenImageVAE._tile_args(tile_size, tile_stride)
        return _tiled(self._decode, latents, size, stride, scale_in=1, scale_out=self.config.spatial_factor).clamp(-1, 1)
