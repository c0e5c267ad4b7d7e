"""EliGen parity with DiffSynth-Studio 2.1.12: one DiT call with entity prompts and masks, the same velocity.

Both DiTs are tiny (2 layers, 2 heads x 32, text width 64, RoPE axes 8/12/12) and hold the same random weights;
then also the same random rank-4 LoRA on the EliGen LoRA's training targets, a file in DiffSynth's own layout
that each tool loads with its own loader (DiffSynth fuses it; ours runs it beside the weights). Masks are PIL
images read by each tool's own code: boxes off the patch grid, overlapping; scattered pixels at another size;
white boxes on a transparent background (RGBA).

The one known difference is not EliGen's: DiffSynth's MLP activation is x * sigmoid(1.702 x), where the
official (diffusers) model and ours use tanh-GELU. The test switches DiffSynth's to tanh-GELU on its model's
instances, so what is compared is the EliGen structure: each entity's states packed before the global prompt,
text RoPE restarting at the same offset per segment, masks resized to the latent grid and read per 2x2 patch,
the attention mask (entity text <-> its region, segments blind to each other), and the negative branch's rule.
DiffSynth joins the sequence as [text, image] and we as [image, text]; attention does not care about order.
DiffSynth is called through its pipeline's `model_fn_qwen_image`, one CFG branch per call (its model function
takes one row); ours as our pipeline calls it, both branches in one batch when guidance is batched.
"""

import pytest
import torch
import torch.nn as nn
from PIL import Image

import diffsynth_reference as reference
from conftest import rel_err
from lora_files import peft_layout, random_pairs
from qistudio.conditioning.eligen import entity_control, entity_text
from qistudio.conditioning.prompt import concat_text_states
from qistudio.conditioning.sequence import build_sequence
from qistudio.lora import load_lora
from qistudio.models.dit import DiTConfig, QwenImageDiT
from qistudio.models.text_encoder import TextStates
from qistudio.ops.packing import patchify, unpatchify
from qistudio.ops.rope import ImageGrid
from tiny_models import AXES, TEXT_DIM, _perturb

reference.require_diffsynth()  # skips the module when DiffSynth-Studio is not installed

CONFIG = DiTConfig(num_layers=2, num_heads=2, head_dim=32, text_dim=TEXT_DIM, axes_dim=AXES)
# DiffSynth's recommended Qwen-Image LoRA targets, with which the EliGen LoRAs were trained (facts 5.4).
ELIGEN_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                  "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
LATENT_H, LATENT_W = 8, 12  # a 4 x 6 patch grid; images 64 x 96
SIGMA = 0.75  # exact in float32, and so is DiffSynth's timestep 750 / 1000
TOLERANCE = 1e-5  # measured about 2e-7 (float32); the subtlest slip tried, entity texts seeing each other: 2e-4


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    targets = [name for name, _ in model.named_modules() if name.endswith(tuple("." + t for t in ELIGEN_TARGETS))]
    assert len(targets) == CONFIG.num_layers * len(ELIGEN_TARGETS)
    return peft_layout(random_pairs(model, targets, rank=4, seed=5), adapter="default", alpha=None)


@pytest.fixture(scope="module")
def weights():
    """The shared base weights (a perturbed tiny DiT's) and the LoRA file's tensors."""
    torch.manual_seed(0)
    dit = _perturb(QwenImageDiT(CONFIG))
    return {k: v.clone() for k, v in dit.state_dict().items()}, _lora(dit)


def _diffsynth_dit(weights, with_lora: bool = True, tanh_gelu: bool = True):
    from diffsynth.utils.lora.general import GeneralLoRALoader

    state, lora = weights
    dit = reference.tiny_dit(CONFIG.num_layers, CONFIG.num_heads, CONFIG.head_dim, TEXT_DIM, AXES)
    dit.load_state_dict(state, strict=True)  # the same tensor names (facts 1.2)
    if with_lora:
        GeneralLoRALoader(device="cpu", torch_dtype=torch.float32).fuse_lora_to_base_model(dit, lora)
    if tanh_gelu:
        assert reference.use_tanh_gelu(dit) == 2 * CONFIG.num_layers
    return dit


@pytest.fixture(scope="module", params=["base", "lora"])
def dits(weights, request):
    """(ours, DiffSynth's): the base weights alone, then with the LoRA."""
    with_lora = request.param == "lora"
    ours = QwenImageDiT(CONFIG)
    ours.load_state_dict(weights[0], strict=True)
    if with_lora:
        load_lora(ours, weights[1])
    return ours.eval(), _diffsynth_dit(weights, with_lora)


def box_mask(box, size=(8 * LATENT_W, 8 * LATENT_H), mode="RGB") -> Image.Image:
    """A white box on black; in RGBA, an opaque white box on transparent black (as drawn on an empty layer)."""
    mask = Image.new(mode, size)
    mask.paste((255,) * len(mode), box)
    return mask


def noise_mask(generator, density: float, size=(48, 32)) -> Image.Image:
    """Scattered white pixels at half the image size (masks come in any size)."""
    on = torch.rand(size[1], size[0], generator=generator) < density
    return Image.fromarray((on.numpy() * 255).astype("uint8"), "L").convert("RGB")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return dict(
        latents=torch.randn(1, 16, LATENT_H, LATENT_W, generator=g),
        prompt=torch.randn(5, TEXT_DIM, generator=g),
        entities=[torch.randn(3, TEXT_DIM, generator=g), torch.randn(4, TEXT_DIM, generator=g)],
        negative=torch.randn(6, TEXT_DIM, generator=g),
        # Boxes off the 16-pixel patch grid (partly covered patches count) and overlapping each other.
        boxes=[box_mask((10, 6, 58, 42)), box_mask((40, 20, 90, 60))],
        noise=[noise_mask(g, 0.15), noise_mask(g, 0.1)],
        alpha=[box_mask((10, 6, 58, 42), mode="RGBA"), box_mask((40, 20, 90, 60), mode="RGBA")],
    )


def _states(rows: list[torch.Tensor]) -> TextStates:
    """Unpadded (L_i, D) states as one right-padded batch, as the text encoder returns them."""
    width = max(r.shape[0] for r in rows)
    return TextStates(torch.stack([nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows]),
                      [r.shape[0] for r in rows])


def _ours(dit: QwenImageDiT, latents: torch.Tensor, text: TextStates, masks) -> torch.Tensor:
    """Velocity (B, 16, h, w) as our pipeline's velocity function computes it, the batch sharing `latents`."""
    batch = text.states.shape[0]
    token_masks = entity_control(["entity"] * len(masks), masks, False, LATENT_H, LATENT_W).token_masks
    seq = build_sequence(ImageGrid(0, LATENT_H // 2, LATENT_W // 2), [[] for _ in range(batch)], text, AXES,
                         entity_token_masks=token_masks)
    with torch.no_grad():
        tokens = dit(patchify(latents).expand(batch, -1, -1), seq.text.states, torch.full((batch,), SIGMA),
                     seq.rotary, seq.text_lengths, num_target_tokens=seq.num_target_tokens,
                     condition_token_mask=seq.condition_token_mask, attention_mask=seq.attention_mask)
    return unpatchify(tokens, LATENT_H // 2, LATENT_W // 2)


def _theirs(dit, inputs, masks, prompt=None, entities=None) -> torch.Tensor:
    entity_masks = None if entities is None else reference.entity_masks(masks, LATENT_H, LATENT_W)
    prompt = inputs["prompt"] if prompt is None else prompt
    return reference.velocity(dit, inputs["latents"], SIGMA, prompt, entities, entity_masks)


@pytest.mark.parametrize("masks", ["boxes", "noise", "alpha"])
def test_entity_velocity_matches_diffsynth(dits, inputs, masks):
    """Masks go through each tool's own reading: ours `entity_control`, DiffSynth's its EliGen unit."""
    ours_dit, their_dit = dits
    text = entity_text(_states(inputs["entities"]), _states([inputs["prompt"]]))
    ours = _ours(ours_dit, inputs["latents"], text, inputs[masks])
    theirs = _theirs(their_dit, inputs, inputs[masks], entities=inputs["entities"])
    assert ours.shape == theirs.shape == (1, 16, LATENT_H, LATENT_W)
    assert rel_err(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("on_negative", [False, True], ids=["plain_negative", "eligen_on_negative"])
def test_guidance_batch_matches_diffsynth(dits, inputs, on_negative):
    """Our batched [positive, negative] rows equal DiffSynth's two branch calls (pipeline.encode_text's packing)."""
    ours_dit, their_dit = dits
    masks = inputs["boxes"]
    positive = entity_text(_states(inputs["entities"]), _states([inputs["prompt"]]))
    negative = _states([inputs["negative"]])
    if on_negative:  # DiffSynth's rule: the negative prompt stands in for every entity, under the same masks
        negative = entity_text(_states([inputs["negative"]] * len(masks)), negative)
    ours = _ours(ours_dit, inputs["latents"], concat_text_states([positive, negative]), masks)

    theirs_positive = _theirs(their_dit, inputs, masks, entities=inputs["entities"])
    theirs_negative = _theirs(their_dit, inputs, masks, prompt=inputs["negative"],
                              entities=[inputs["negative"]] * len(masks) if on_negative else None)
    assert rel_err(ours[:1], theirs_positive) <= TOLERANCE
    assert rel_err(ours[1:], theirs_negative) <= TOLERANCE


def test_the_comparison_can_fail(weights, inputs):
    """The tolerance separates real differences: the entities change DiffSynth's velocity, and so does its
    own activation (so the switch to tanh-GELU is in effect). Base weights, no LoRA."""
    ours_dit = QwenImageDiT(CONFIG)
    ours_dit.load_state_dict(weights[0], strict=True)
    masks = inputs["boxes"]
    text = entity_text(_states(inputs["entities"]), _states([inputs["prompt"]]))
    ours = _ours(ours_dit.eval(), inputs["latents"], text, masks)
    without_entities = _theirs(_diffsynth_dit(weights, with_lora=False), inputs, masks)
    sigmoid_gelu = _theirs(_diffsynth_dit(weights, with_lora=False, tanh_gelu=False), inputs, masks,
                           entities=inputs["entities"])
    assert rel_err(ours, without_entities) > 100 * TOLERANCE
    assert rel_err(ours, sigmoid_gelu) > 10 * TOLERANCE
