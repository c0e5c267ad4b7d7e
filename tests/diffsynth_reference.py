"""DiffSynth-Studio as a test reference: imported with its hub client stubbed, its Qwen-Image DiT built tiny.

A test-only dependency, installed without its dependencies (`.ci/run`: `pip install --no-deps diffsynth==2.1.12
einops==0.8.2`); einops is the one real dependency of the code we run (every rearrange in its DiT and model
function), so it is installed, not stubbed. Tests skip when diffsynth is not installed (`require_diffsynth`).

What is stubbed, and why. `import diffsynth.<anything>` runs `diffsynth/__init__.py`, which imports all of
`diffsynth.core`, whose modules import at load time:
- `modelscope` (`core/loader/config.py`: `from modelscope import snapshot_download`): its hub client. Replaced by a
  module whose `snapshot_download` raises, so nothing here can reach a hub or depend on the hub client's version.
- `imageio`, `imageio.v3` (`core/data/operators.py`) and `pandas` (`core/data/unified_dataset.py`): its training
  data set and video readers, not dependencies of qistudio. Empty modules, and only when not installed.
`huggingface_hub` (`from huggingface_hub import snapshot_download`) is left real: transformers needs it anyway.
The stubs are in `sys.modules` only while diffsynth imports; afterwards the real entries (or none) are restored,
so no other test sees them. Nothing of DiffSynth's own code is patched, except what a test says it patches.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REFERENCE_VERSION = "2.1.12"


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo calls find_spec on some names
    module.__dict__.update(attributes)
    return module


def _no_hub(*args, **kwargs):
    raise RuntimeError("the modelscope hub client is stubbed in the DiffSynth-Studio reference tests")


def _stubs() -> dict[str, types.ModuleType]:
    stubs = {"modelscope": _module("modelscope", snapshot_download=_no_hub)}
    if importlib.util.find_spec("imageio") is None:
        stubs["imageio.v3"] = _module("imageio.v3")
        stubs["imageio"] = _module("imageio", v3=stubs["imageio.v3"])
    if importlib.util.find_spec("pandas") is None:
        stubs["pandas"] = _module("pandas")
    return stubs


def require_diffsynth() -> types.ModuleType:
    """diffsynth.pipelines.qwen_image (its model function, EliGen unit, and through it the DiT module).

    Skips when diffsynth is not installed or is not the pinned version. Not pytest.importorskip: that would
    import diffsynth before the stubs are in place, and would turn a broken reference install into a skip.
    """
    name = "diffsynth.pipelines.qwen_image"
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec("diffsynth") is None:
        pytest.skip(f"DiffSynth-Studio is not installed (pip install --no-deps diffsynth=={REFERENCE_VERSION} einops)",
                    allow_module_level=True)
    version = importlib.metadata.version("diffsynth")
    if version != REFERENCE_VERSION:
        pytest.skip(f"DiffSynth-Studio {version} is installed; these tests pin {REFERENCE_VERSION}",
                    allow_module_level=True)
    stubs = _stubs()
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        import diffsynth.pipelines.qwen_image as pipeline
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
    return pipeline


def tiny_dit(num_layers: int, num_heads: int, head_dim: int, text_dim: int, axes_dim: tuple[int, int, int]):
    """DiffSynth's QwenImageDiT at a tiny size, float32, weights left as initialised (load a state dict next).

    Its constructor hard-codes the 20B sizes (3072 wide, 24 x 128 heads, text 3584, RoPE axes 16/56/56), so it
    is run on the meta device with no blocks, and each of its children is replaced by the same class with the
    same arguments as that constructor passes, at the tiny size. The check on the children's names fails loudly
    if a later version's constructor adds one.
    """
    from diffsynth.models import qwen_image_dit as ds
    from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings

    dim = num_heads * head_dim
    with torch.device("meta"):
        model = ds.QwenImageDiT(num_layers=0)
    sized = dict(
        pos_embed=ds.QwenEmbedRope(theta=10000, axes_dim=list(axes_dim), scale_rope=True),
        time_text_embed=TimestepEmbeddings(256, dim, diffusers_compatible_format=True, scale=1000,
                                           align_dtype_to_timestep=False, use_additional_t_cond=False),
        txt_norm=RMSNorm(text_dim, eps=1e-6),
        img_in=nn.Linear(64, dim),
        txt_in=nn.Linear(text_dim, dim),
        transformer_blocks=nn.ModuleList(
            [ds.QwenImageTransformerBlock(dim=dim, num_attention_heads=num_heads, attention_head_dim=head_dim)
             for _ in range(num_layers)]
        ),
        norm_out=AdaLayerNorm(dim, single=True),
        proj_out=nn.Linear(dim, 64),
    )
    children = {name for name, _ in model.named_children()}
    assert children == set(sized), f"DiffSynth's QwenImageDiT now has children {sorted(children)}"
    for name, module in sized.items():
        setattr(model, name, module)
    return model.float().eval()


def use_tanh_gelu(model: nn.Module) -> int:
    """Make DiffSynth's MLP activation tanh-GELU (diffusers' and ours) instead of x * sigmoid(1.702 x).

    Per instance (its class is untouched); returns how many activations were switched.
    """
    from diffsynth.models.qwen_image_dit import ApproximateGELU

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")

    count = 0
    for module in model.modules():
        if isinstance(module, ApproximateGELU):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def entity_masks(masks, latent_height: int, latent_width: int) -> torch.Tensor:
    """(1, N, 1, h, w) float32: PIL masks through DiffSynth's EliGen unit, as `prepare_entity_inputs` stacks them."""
    pipeline = require_diffsynth()
    pipe = pipeline.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    unit = pipeline.QwenImageUnit_EntityControl()
    return torch.cat(unit.preprocess_masks(pipe, masks, latent_height, latent_width, 1), dim=0).unsqueeze(0)


def velocity(dit, latents: torch.Tensor, sigma: float, prompt_emb: torch.Tensor, entity_prompt_embs=None,
             masks: torch.Tensor | None = None) -> torch.Tensor:
    """One call of DiffSynth's `model_fn_qwen_image`, as its pipeline makes it for one CFG branch.

    latents (1, 16, h, w); prompt_emb (L, D) unpadded; entity_prompt_embs: list of (L_k, D) or None (no EliGen);
    masks (1, N, 1, h, w) from `entity_masks`. The pipeline passes `timestep` = sigma * 1000, shape (1,).
    Returns the velocity (1, 16, h, w).
    """
    pipeline = require_diffsynth()

    def with_mask(states):
        return states[None], torch.ones(1, states.shape[0], dtype=torch.long)

    prompt, prompt_mask = with_mask(prompt_emb)
    eligen = {}
    if entity_prompt_embs is not None:
        pairs = [with_mask(e) for e in entity_prompt_embs]
        eligen = dict(entity_prompt_emb=[p for p, _ in pairs], entity_prompt_emb_mask=[m for _, m in pairs],
                      entity_masks=masks)
    with torch.no_grad():
        return pipeline.model_fn_qwen_image(
            dit=dit, latents=latents, timestep=torch.tensor([sigma * 1000], dtype=latents.dtype),
            prompt_emb=prompt, prompt_emb_mask=prompt_mask, height=latents.shape[-2] * 8,
            width=latents.shape[-1] * 8, **eligen,
        )
