"""Qwen-Image-Layered training samples: an image and its RGBA layers -> what the Layered DiT reads and predicts.

Design note. The data follow DiffSynth-Studio's Layered training (its train.py and Qwen-Image-Layered.sh): a row's
`image` is a list of RGBA files, the composite first and then the layers bottom first (the frames the model
generates, frame 0 the composite, as `qistudio layers` writes them after it), `layer_input_image` is the input
image the layers decompose, and `layer_num` (optional here) says how many layers there are. The seed's command
names them as `--data_file_keys "image,layer_input_image" --extra_inputs "layer_num,layer_input_image"`.

Everything the DiT reads is inference's own (layered.py, conditioning/layered.py): every frame and the input
image encoded by the RGBA VAE, the frames packed one after the other and followed by the input image's tokens, the
layer-3D RoPE (frame f at position f, the input at -1), the extra timestep row (index 0, the DiT's default), and
the prompt encoded with Layered's 512-token limit. The prompt is used as given, as the reference trains (an empty
one is not captioned). The loss is the usual flow matching on all layers + 1 frames (loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components import Components
from ..conditioning.layered import layered_rotary, pack_frames, rgba_tensor
from ..conditioning.prompt import encode_prompts
from ..layered import MAX_TEXT_TOKENS, require_layered_models
from ..ops.packing import patchify

INPUT_KEY = "layer_input_image"
COUNT_KEY = "layer_num"


@dataclass
class LayeredSample:
    latents: torch.Tensor  # (1, F, 16, h, w): frame 0 the composite, then the layers; x0
    condition: torch.Tensor  # (1, N, 64) the input image's patchified latents
    text_states: torch.Tensor  # (1, L, D)
    text_lengths: list[int]

    @property
    def num_target_tokens(self) -> int:
        frames, _, height, width = self.latents.shape[1:]
        return frames * (height // 2) * (width // 2)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, F, 16, h, w) -> (1, F N, 64) tokens, frames one after the other."""
        return pack_frames(latents)

    def velocity(self, dit, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The DiT over [frames | input image] as Layered inference calls it: tokens (B, F N, 64) -> velocity."""
        frames, height, width = self.latents.shape[1], *self.latents.shape[-2:]
        rotary = layered_rotary(frames, (height, width), self.text_states.shape[1], dit.config.axes_dim,
                                tokens.device)
        joined = torch.cat([tokens, self.condition.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)
        return dit(joined, self.text_states, timestep, rotary, self.text_lengths, num_target_tokens=tokens.shape[1])


def check_layered_row(sample: dict) -> None:
    """A loaded row's ValueError (the dataset skips such a row, naming why): frames, layer count and sizes."""
    frames = sample.get("image")
    if not isinstance(frames, list) or len(frames) < 2:
        count = len(frames) if isinstance(frames, list) else 1
        raise ValueError(f"Qwen-Image-Layered's image must list the composite and then at least one layer (a json "
                         f"list of RGBA files); this row has {count} file(s), that is {count - 1} layer(s)")
    if sample.get(INPUT_KEY) is None:
        raise ValueError(f"the row has no {INPUT_KEY} (the input image the layers decompose)")
    given = sample.get(COUNT_KEY)
    if given not in (None, ""):
        try:
            count = int(str(given).strip())
        except ValueError:
            raise ValueError(f"{COUNT_KEY} must be a whole number, got {given!r}") from None
        if count != len(frames) - 1:
            raise ValueError(f"{COUNT_KEY} is {count}, but image lists {len(frames) - 1} layer(s) after the composite")
    sizes = {image.size for image in [*frames, sample[INPUT_KEY]]}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise ValueError(f"the composite, its layers and {INPUT_KEY} must have one size; they come out at {shown}")


def encode_layered(components: Components, sample: dict, device, dtype: torch.dtype) -> LayeredSample:
    """Encode one loaded row with the frozen RGBA VAE and text encoder (no gradients)."""
    require_layered_models(components)
    vae = components.vae
    vae_dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        frames = torch.cat([vae.encode(rgba_tensor(frame, device, vae_dtype)) for frame in sample["image"]])
        condition = patchify(vae.encode(rgba_tensor(sample[INPUT_KEY], device, vae_dtype)).to(dtype))
        text = encode_prompts(components.text_encoder, components.prompt_tokenizer(), [sample["prompt"]], device,
                              dtype, max_length=MAX_TEXT_TOKENS)
    return LayeredSample(frames[None].to(dtype), condition, text.states, list(text.lengths))
