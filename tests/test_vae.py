"""Our 2D-conv VAE against the checkpoint layout and diffusers' 3D AutoencoderKLQwenImage; tiling against untiled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qistudio.models.vae import QwenImageVAE, VAEConfig, _ramp, _tile_spans

CHECKPOINT_JSON = Path(__file__).resolve().parent / "data" / "checkpoints" / "qwen_image_vae.json"
TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)  # full 8x factor, real latent stats


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- layout


def test_full_size_layout_equals_checkpoint():
    listed = {k: tuple(v) for k, v in json.loads(CHECKPOINT_JSON.read_text())["tensors"].items()}
    with torch.device("meta"):
        model = QwenImageVAE(VAEConfig())
    ours = _shapes(model)
    assert sorted(set(listed) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(listed)) == []  # extra
    assert {k: (ours[k], listed[k]) for k in listed if ours[k] != listed[k]} == {}
    assert list(model.buffers()) == []
    assert VAEConfig.from_shapes(listed) == VAEConfig()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True]),
        dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, input_channels=4),
    ],
)
def test_layout_and_config_inference_match_diffusers(kwargs):
    from diffusers import AutoencoderKLQwenImage

    z_dim = kwargs["z_dim"]
    if z_dim != 16:  # diffusers' default statistics have 16 values
        kwargs = dict(kwargs, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    ref = AutoencoderKLQwenImage(**kwargs)
    cfg = VAEConfig.from_shapes(_shapes(ref))
    assert cfg == VAEConfig.from_diffusers_config(dict(ref.config))
    with torch.device("meta"):
        assert _shapes(QwenImageVAE(cfg)) == _shapes(ref)


# ---------------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded tiny diffusers VAE saved as diffusers does, and ours loaded strictly from its safetensors file."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage(**TINY).eval()
    with torch.no_grad():  # move off the identity/zero init so every tensor matters
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    cfg = VAEConfig.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    assert cfg == VAEConfig.from_diffusers_config(json.loads((folder / "config.json").read_text()))
    ours = QwenImageVAE(cfg).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours


def _ref_stats(ref) -> tuple[torch.Tensor, torch.Tensor]:
    # As diffusers' QwenImage pipelines do: (mu - mean) * (1 / std), shaped for (B, C, T, H, W).
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, inv_std


@torch.no_grad()
def test_encode_matches_diffusers(tiny):
    ref, ours = tiny
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    mean, inv_std = _ref_stats(ref)
    expected = ((ref.encode(images[:, :, None]).latent_dist.mode() - mean) * inv_std)[:, :, 0]
    latents = ours.encode(images)
    assert latents.shape == (2, 16, 6, 10)
    assert _rel(latents, expected) <= 1e-4


@torch.no_grad()
def test_decode_matches_diffusers(tiny):
    ref, ours = tiny
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(2))
    mean, inv_std = _ref_stats(ref)
    raw = latents[:, :, None] / inv_std + mean
    images = ours.decode(latents)
    assert images.shape == (2, 3, 48, 80)
    # diffusers' decode clamps to [-1, 1]; ours does not (as DiffSynth), so compare clamped ...
    assert _rel(images.clamp(-1, 1), ref.decode(raw).sample[:, :, 0]) <= 1e-4
    # ... and unclamped against diffusers' decoder called without a feature cache (DiffSynth's path).
    assert _rel(images, ref.decoder(ref.post_quant_conv(raw))[:, :, 0]) <= 1e-4


@torch.no_grad()
def test_time_conv_is_unused_for_images(tiny):
    _, ours = tiny
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    before = ours.decode(latents)
    saved = {n: p.clone() for n, p in ours.named_parameters() if "time_conv" in n}
    assert saved  # the tiny config has temporal resamplers
    try:
        for name, param in ours.named_parameters():
            if "time_conv" in name:
                param.normal_()
        assert torch.equal(ours.decode(latents), before)
    finally:
        ours.load_state_dict(saved, strict=False)


@torch.no_grad()
def test_bfloat16_weights_compute_in_bfloat16(tiny):
    _, ours = tiny
    latents = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(4))
    expected = ours.decode(latents)
    low = QwenImageVAE(ours.config).to(torch.bfloat16)
    low.load_state_dict(ours.state_dict())
    images = low.decode(latents)  # float32 latents are cast to the weights' dtype
    assert images.dtype == torch.bfloat16
    assert _rel(images.float(), expected) <= 0.05


# ---------------------------------------------------------------------------------------------------- tiling


def test_tile_spans_follow_diffsynth():
    assert _tile_spans(24, 16, 8) == [(0, 16), (8, 24)]  # start 16 skipped: the tile at 8 reached the border
    assert _tile_spans(40, 16, 8) == [(0, 16), (8, 24), (16, 32), (24, 40)]
    assert _tile_spans(40, 16, 12) == [(0, 16), (12, 28), (24, 40)]
    assert _tile_spans(10, 16, 8) == [(0, 10)]
    assert _ramp(6, 3, True, False).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert _ramp(6, 3, False, True).tolist() == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    assert _ramp(6, 0, True, True).tolist() == [1] * 6


def _edge_jump_ratio(tiled: torch.Tensor, full: torch.Tensor, edges: list[int], dim: int) -> float:
    """Mean |step| between neighbours across tile edges, tiled over untiled: a seam makes it grow."""

    def steps(x):
        return x.diff(dim=dim).abs().movedim(dim, 0)[[e - 1 for e in edges]].mean()

    return (steps(tiled) / steps(full)).item()


@torch.no_grad()
def test_tiled_decode_is_close_and_seamless(tiny):
    _, ours = tiny
    latents = torch.randn(1, 16, 24, 40, generator=torch.Generator().manual_seed(5))
    full = ours.decode(latents)
    tiled = ours.decode(latents, tiled=True, tile_size=16, tile_stride=8)
    assert tiled.shape == full.shape == (1, 3, 192, 320)
    # Random weights and a global mid-block attention make tiles disagree more than trained weights do:
    # measured 0.115 relative; with no overlap (tile 8 / stride 8) it is 0.69.
    assert _rel(tiled, full) <= 0.15
    col_edges = [e * 8 for span in _tile_spans(40, 16, 8) for e in span if 0 < e < 40]
    row_edges = [e * 8 for span in _tile_spans(24, 16, 8) for e in span if 0 < e < 24]
    # Measured about 0.97 with blending, 1.6 with hard tile edges (tile 8 / stride 8).
    assert _edge_jump_ratio(tiled, full, col_edges, dim=3) <= 1.2
    assert _edge_jump_ratio(tiled, full, row_edges, dim=2) <= 1.2
    whole = ours.decode(latents, tiled=True, tile_size=(24, 40), tile_stride=(24, 40))
    torch.testing.assert_close(whole, full, rtol=0, atol=1e-6)
    overlapping_ramps = ours.decode(latents, tiled=True, tile_size=16, tile_stride=4)  # stride < size / 2
    assert _rel(overlapping_ramps, full) <= 0.15


@torch.no_grad()
def test_tiled_encode_is_close(tiny):
    _, ours = tiny
    images = torch.tanh(ours.decode(torch.randn(1, 16, 24, 40, generator=torch.Generator().manual_seed(6))))
    full = ours.encode(images)
    tiled = ours.encode(images, tiled=True, tile_size=16, tile_stride=8)
    assert tiled.shape == full.shape == (1, 16, 24, 40)
    assert _rel(tiled, full) <= 0.1  # measured 0.070 with random weights (no overlap: 0.35)
    whole = ours.encode(images, tiled=True, tile_size=64, tile_stride=64)
    torch.testing.assert_close(whole, full, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "size, stride, match",
    [
        (8, 16, "tile_stride 16 must not exceed tile_size 8"),
        ((16, 8), (8, 12), r"tile_stride \(8, 12\) must not exceed"),
        (0, 8, "tile_size must be a positive int.*got 0"),
        (16, -4, "tile_stride must be a positive int.*got -4"),
        (16.0, 8, "tile_size .* got 16.0"),
        ((16, 16, 16), 8, r"tile_size .* got \(16, 16, 16\)"),
    ],
)
def test_bad_tile_arguments_raise(tiny, size, stride, match):
    _, ours = tiny
    with pytest.raises(ValueError, match=match):
        ours.decode(torch.zeros(1, 16, 4, 4), tiled=True, tile_size=size, tile_stride=stride)
    with pytest.raises(ValueError, match=match):
        ours.encode(torch.zeros(1, 3, 32, 32), tiled=True, tile_size=size, tile_stride=stride)


def test_bad_shapes_and_configs_raise(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match=r"\(36, 40\) must be a multiple of 8"):
        ours.encode(torch.zeros(1, 3, 36, 40))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(1, 4, 32, 32\)"):
        ours.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"latents must be \(B, 16, h, w\), got \(1, 4, 4, 4\)"):
        ours.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="latents_mean has 16 values but z_dim is 4"):
        VAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="tensor 'encoder.conv_in.weight' is missing"):
        VAEConfig.from_shapes({"decoder.conv_in.weight": (384, 16, 3, 3, 3)})
