"""What a server was started with: the model it names, its defaults, its limits, and its API key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask, so that no request can exhaust the server by itself."""

    max_body_bytes: int = 64 * 2**20  # the whole request, uploads included
    max_images_in: int = 8  # images given to one edit
    max_input_pixels: int = 4096 * 4096  # per uploaded image, read from its header before it is decoded
    max_pixels: int = 2048 * 2048  # of an output image (width x height)
    max_n: int = 8
    max_steps: int = 100
    max_prompt_chars: int = 10_000
    max_loras: int = 8  # per request
    max_layers: int = 16  # layers of one layers edit (Qwen-Image-Layered)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the id /v1/models lists and requests may name
    png_model: str | None = None  # what PNGs record as "model" (the CLI's --model value; None for the demo)
    demo: bool = False
    family: str = "qwen-image"  # the engine's ModelSpec.family: "qwen-image", "qwen-image-layered", "qwen-image-2.1"
    controlnets: tuple[str, ...] = ()  # the served ControlNets' names, by index (what PNGs record)
    default_size: tuple[int, int] = (1328, 1328)  # (width, height) for size "auto" without edit images
    default_steps: int = 30
    picture_template: bool = False  # the model reads even one edit image as "Picture 1:" (Edit-2509/2511)
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))
