"""A training sample -> what the DiT reads: target latents plus the fixed part of its sequence (text, RoPE, edits).

Nothing here is written for training: the sample becomes a GenerationRequest (guidance off, as the reference
trains) and goes through the pipeline's own conditioning (encode_text, encode_edit_latents) and
conditioning.sequence.build_sequence, so a trained model sees exactly the inputs inference gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components import Components
from ..conditioning.sequence import DiTSequence, build_sequence
from ..imageio import image_to_tensor
from ..ops.rope import ImageGrid
from ..pipeline import encode_edit_latents, encode_text
from ..request import build_request


@dataclass
class EncodedSample:
    latents: torch.Tensor  # (1, 16, h, w) VAE latents of the target image: x0
    sequence: DiTSequence  # text states, RoPE tables and condition tokens for one row

    @property
    def num_target_tokens(self) -> int:
        return self.sequence.num_target_tokens


def sample_request(sample: dict, extra_inputs: tuple[str, ...], zero_cond_t: bool | None):
    image = sample["image"]
    edit_image = sample.get("edit_image") if "edit_image" in extra_inputs else None
    return build_request(sample["prompt"], height=image.height, width=image.width, cfg_scale=1.0, seed=0,
                         edit_image=edit_image or None, zero_cond_t=zero_cond_t)


def encode_sample(components: Components, sample: dict, extra_inputs: tuple[str, ...], zero_cond_t: bool | None,
                  device, dtype: torch.dtype) -> EncodedSample:
    """Encode one loaded sample with the frozen text encoder and VAE (no gradients)."""
    request = sample_request(sample, extra_inputs, zero_cond_t)
    with torch.no_grad():
        vae_dtype = components.vae.quant_conv.weight.dtype
        latents = components.vae.encode(image_to_tensor(sample["image"], device, vae_dtype)).to(dtype)
        positive, _ = encode_text(components, request, device, dtype)
        conditions = encode_edit_latents(components, request, device, dtype)
    dit_config = components.dit.config
    use_zero_cond_t = dit_config.zero_cond_t if request.zero_cond_t is None else request.zero_cond_t
    h, w = request.latent_size
    sequence = build_sequence(ImageGrid(0, h // 2, w // 2), conditions, positive, dit_config.axes_dim,
                              zero_cond_t=use_zero_cond_t)
    return EncodedSample(latents, sequence)
