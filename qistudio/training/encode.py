"""A training sample -> what the DiT reads: target latents plus the fixed part of its sequence and its controls.

Nothing here is written for training: the sample becomes a GenerationRequest (guidance off, as the reference
trains) and goes through the pipeline's own conditioning: encode_text (prompt, edit images, EliGen entities),
encode_images (edit and context latents, ControlNet maps with the Inpaint ControlNet's mask rule) and
conditioning.sequence.build_sequence, so a trained model sees exactly the inputs inference gives it. In-Context
prompts get the pipeline's trigger prefix, as they do at inference.

The extra inputs map to the request as the reference's parse_extra_inputs maps them: `edit_image`,
`context_image`, `eligen_entity_prompts`/`eligen_entity_masks` by name, and `blockwise_controlnet_<field>` to one
ControlNetInput(<field>=...) for the first ControlNet (`image`, `inpaint_mask`). An empty `context_image` (a
blank csv cell, a null) means the sample has none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..components import Components
from ..conditioning.control import ControlNetInput
from ..conditioning.sequence import DiTSequence, build_sequence
from ..imageio import image_to_tensor
from ..ops.rope import ImageGrid
from ..pipeline import encode_images, encode_text, require_components
from ..request import build_request

CONTROLNET_PREFIX = "blockwise_controlnet_"


@dataclass
class EncodedSample:
    latents: torch.Tensor  # (1, 16, h, w) VAE latents of the target image: x0
    sequence: DiTSequence  # text states (entity segments included), RoPE tables, condition tokens, attention mask
    # Per ControlNet input: its settings (id, scale, window; images dropped once encoded) and its patchified
    # control latents (1, N, 64), or (1, N, 68) with the Inpaint ControlNet's mask channel.
    controls: list[tuple[ControlNetInput, torch.Tensor]] = field(default_factory=list)

    @property
    def num_target_tokens(self) -> int:
        return self.sequence.num_target_tokens

    @property
    def target_grid(self) -> ImageGrid:
        return ImageGrid(0, self.latents.shape[-2] // 2, self.latents.shape[-1] // 2)


def _given(sample: dict, key: str, extra_inputs: tuple[str, ...]):
    value = sample.get(key) if key in extra_inputs else None
    return None if value is None or (isinstance(value, (str, list)) and not value) else value


def sample_conditions(sample: dict, extra_inputs: tuple[str, ...]) -> dict:
    """The sample's extra inputs as the pipeline's keyword arguments (edit, context, ControlNet, EliGen)."""
    control = {key[len(CONTROLNET_PREFIX):]: sample[key] for key in extra_inputs
               if key.startswith(CONTROLNET_PREFIX) and _given(sample, key, extra_inputs) is not None}
    return dict(edit_image=_given(sample, "edit_image", extra_inputs),
                context_image=_given(sample, "context_image", extra_inputs),
                blockwise_controlnet_inputs=[ControlNetInput(**control)] if control else None,
                eligen_entity_prompts=_given(sample, "eligen_entity_prompts", extra_inputs),
                eligen_entity_masks=_given(sample, "eligen_entity_masks", extra_inputs))


def sample_request(sample: dict, extra_inputs: tuple[str, ...], zero_cond_t: bool | None):
    image = sample["image"]
    return build_request(sample["prompt"], height=image.height, width=image.width, cfg_scale=1.0, seed=0,
                         zero_cond_t=zero_cond_t, **sample_conditions(sample, extra_inputs))


def encode_sample(components: Components, sample: dict, extra_inputs: tuple[str, ...], zero_cond_t: bool | None,
                  device, dtype: torch.dtype) -> EncodedSample:
    """Encode one loaded sample with the frozen text encoder and VAE (no gradients)."""
    request = sample_request(sample, extra_inputs, zero_cond_t)
    require_components(components, request)
    with torch.no_grad():
        vae_dtype = components.vae.quant_conv.weight.dtype
        latents = components.vae.encode(image_to_tensor(sample["image"], device, vae_dtype)).to(dtype)
        positive, _ = encode_text(components, request, device, dtype)
        images = encode_images(components, request, None, 1.0, device, dtype)
    dit_config = components.dit.config
    use_zero_cond_t = dit_config.zero_cond_t if request.zero_cond_t is None else request.zero_cond_t
    h, w = request.latent_size
    entity_masks = None if request.entities is None else request.entities.token_masks
    sequence = build_sequence(ImageGrid(0, h // 2, w // 2), images.conditions, positive, dit_config.axes_dim,
                              request.edit_rope_interpolation, use_zero_cond_t, entity_masks)
    controls = [(dataclasses.replace(control, image=None, inpaint_mask=None, inpaint_image=None), features)
                for control, features in images.controls]
    return EncodedSample(latents, sequence, controls)
