"""Qwen-Image 2.1 training on the tiny 2.1 repository (CPU): one step's loss and gradients equal a reference built
from diffusers 0.42.1's QwenImage21 classes (its pipeline's prompt and VAE encoding, its transformer's joint pass, no
KV cache) with the same noise and timestep, text-to-image and with two edit images; a LoRA learns and its file loads
back into our QwenImage21Pipeline and into diffusers' alike; full training saves names diffusers loads; the seed's
command line trains it, telling the model from its files; what 2.1 cannot take is refused; training's joint pass
(each block once over prefix and target) equals prefill then forward bit for bit; --checkpointed_blocks checkpoints
the first N blocks' joint calls, with the gradients of checkpointing all."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import rel_err
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.cli.main import main as cli_main
from qistudio.components import load_components
from qistudio.models.dit21 import DiT21Config, QwenImage21DiT
from qistudio.models.layout21 import ImageBlock, JointLayout
from qistudio.training import DataConfig, LossConfig, TrainConfig, Trainer
from qistudio.training.data import ImageDataset, Skipped
from qistudio.training.family import QWEN21, data_rules, row_check
from qistudio.training.loss import Denoiser, flow_matching_loss
from qistudio.training.qwen21 import encode_qwen21
from qistudio.training.timesteps import draw_sigma
from qistudio.weights.build import load_model
from test_training_layered import run_training_example, train_lowers_the_loss
from tiny_qwen21 import (LATENT_CHANNELS, TEXT_DIM, model_configs21, random_inputs, reference_pipeline21,
                         tiny_repository21)

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 64  # training images 64x64: 4x4 latent tokens; edit images at the same area (diffusers' output_resolution 64)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repository21(tmp_path_factory)


@pytest.fixture(scope="module")
def base(repo):
    return load_components(model_configs21(repo), None, ModelConfig(path=str(repo / "processor")), torch.float32,
                           "cpu")


@pytest.fixture(scope="module")
def ref(repo):
    return reference_pipeline21(repo)


def fresh(base):
    return dataclasses.replace(base, dit=copy.deepcopy(base.dit))


def picture(path, size, seed, mode="RGBA"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode).save(path)


def write_dataset(folder, extra=()):
    """Row 0 edits with two images (one RGB, one RGBA with varying alpha), row 1 is text-to-image."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        picture(folder / f"target{k}.png", (SIDE, SIDE), k)
    picture(folder / "edit0.png", (80, 50), 5, "RGB")
    picture(folder / "edit1.png", (40, 70), 6)
    rows = [{"image": "target0.png", "prompt": "make the sky orange", "edit_image": ["edit0.png", "edit1.png"]},
            {"image": "target1.png", "prompt": "a red fox in the snow"}, *extra]
    (folder / "metadata.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data")


def model_paths(repo) -> tuple:
    return tuple(tuple(c.path) if isinstance(c.path, list) else c.path for c in model_configs21(repo))


def make_config(repo, data_dir, output, **overrides) -> TrainConfig:
    data = DataConfig(str(data_dir), str(data_dir / "metadata.json"),
                      **{"data_file_keys": ("image", "edit_image"), **overrides.pop("data", {})})
    defaults = dict(output_path=str(output), model_paths=model_paths(repo), processor_path=str(repo / "processor"),
                    extra_inputs=("edit_image",), lora_base_model="dit", lora_rank=4,
                    lora_target_modules=("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                                         "img_mlp.out"),
                    learning_rate=1e-3, device="cpu")
    if "trainable_models" in overrides:
        defaults.pop("lora_base_model")
    return TrainConfig(data, **{**defaults, **overrides})


def load_row(config: TrainConfig, index: int):
    rules = data_rules(QWEN21)
    return ImageDataset(config.data, row_check(config, QWEN21), rules.rgba_keys, rules.list_keys)[index]


def reference_loss(ref, transformer, row: dict, sigma: float, noise: torch.Tensor, weight: float) -> torch.Tensor:
    """One training step's loss from diffusers' pieces, as its QwenImage21Pipeline prepares a call: condition images
    resized for both the encoder and the VAE at output_resolution^2 (= the target's area), encode_prompt,
    _encode_vae_image for target and conditions, the joint pass with the target's slots appended, sigma as timestep."""
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

    target = row["image"]
    resized, vae_inputs = [], []
    for image in row.get("edit_image") or []:
        image = image.convert("RGBA")
        width, height, _ = calculate_dimensions(SIDE * SIDE, image.width / image.height)
        resized.append(ref.image_processor.resize(image, width=width, height=height))
        vae_inputs.append(ref.image_processor.preprocess(image, width=width, height=height).unsqueeze(2))

    def latents_of(pixels):  # (1, C, 1, h, w) normalised -> (1, C, h, w), and its (1, h w, C) tokens
        latents = ref._encode_vae_image(pixels, None)[:, :, 0]
        return latents, latents.flatten(2).transpose(1, 2)

    with torch.no_grad():
        embeds, embeds_mask, pad_mask = ref.encode_prompt(row["prompt"], image=resized or None, device="cpu")
        x0, _ = latents_of(ref.image_processor.preprocess(target, width=SIDE, height=SIDE).unsqueeze(2))
        conditions = [latents_of(pixels) for pixels in vae_inputs]
    noisy = (1 - sigma) * x0 + sigma * noise
    tokens = noisy.flatten(2).transpose(1, 2)
    blocks = [(1, c.shape[-2], c.shape[-1]) for c, _ in conditions] + [(1, x0.shape[-2], x0.shape[-1])]
    hidden = torch.cat([t for _, t in conditions] + [tokens], dim=1)
    pad_mask = torch.cat([pad_mask, pad_mask.new_ones(1, tokens.shape[1] // 4)], dim=1)
    out = transformer(hidden_states=hidden, timestep=torch.tensor([sigma]), encoder_hidden_states=embeds,
                      encoder_hidden_states_mask=embeds_mask, img_shapes=[blocks], img_mask=pad_mask,
                      return_dict=False)[0][:, -tokens.shape[1]:]
    target_velocity = (noise - x0).flatten(2).transpose(1, 2)
    return F.mse_loss(out.float(), target_velocity.float()) * weight


@pytest.mark.parametrize("index", [0, 1], ids=["two-edit-images", "text-to-image"])
def test_loss_and_gradients_equal_the_diffusers_reference(base, ref, repo, data, tmp_path, index):
    from diffusers import QwenImage21Transformer2DModel

    config = make_config(repo, data, tmp_path / "out")
    row = load_row(config, index)
    sample = encode_qwen21(base, row, "cpu", torch.float32)
    assert sample.latents.shape == (1, LATENT_CHANNELS, SIDE // 16, SIDE // 16)
    assert (sample.condition is not None) == (index == 0)

    generator = torch.Generator().manual_seed(5 + index)
    sigma, weight = draw_sigma(LossConfig(), generator, sample.num_target_tokens)
    noise = torch.randn(sample.latents.shape, generator=generator)
    ours = copy.deepcopy(base.dit).train().requires_grad_(True)
    loss = flow_matching_loss(Denoiser(ours), sample, sigma, noise, weight)
    loss.backward()

    transformer = QwenImage21Transformer2DModel.from_pretrained(repo / "transformer").train()
    expected = reference_loss(ref, transformer, row, sigma, noise, weight)
    expected.backward()
    assert weight > 0 and abs(float(loss) - float(expected)) <= TOLERANCE * float(expected)
    theirs = dict(transformer.named_parameters())
    pairs = [(p.grad, theirs[n].grad) for n, p in ours.named_parameters()]
    assert all(g is not None for pair in pairs for g in pair) and len(pairs) > 20
    assert rel_err(torch.cat([g.flatten() for g, _ in pairs]), torch.cat([r.flatten() for _, r in pairs])) <= TOLERANCE


def test_lora_learns_and_loads_into_our_pipeline_and_diffusers_alike(base, ref, repo, data, tmp_path):
    config = make_config(repo, data, tmp_path / "out", max_steps=40, lr_scheduler="constant", learning_rate=1e-2,
                         lora_rank=8, data=dict(repeat=20))
    trainer, saved = train_lowers_the_loss(config, fresh(base))
    # Every trained layer is in the file, the SwiGLU MLP's included (2.1-only names, once dropped by the export as
    # "no LoRA layer of Qwen-Image").
    written = set(load_file(saved))
    for block in range(base.dit.config.num_layers):
        for module in config.lora_target_modules:
            for part in ("lora_A", "lora_B"):
                found = [k for k in written if k.startswith(f"transformer.transformer_blocks.{block}.")
                         and k.endswith(f".{module}.{part}.weight")]
                assert len(found) == 1, (block, module, part)

    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=model_configs21(repo),
                                             tokenizer_config=None,
                                             processor_config=ModelConfig(path=str(repo / "processor")))
    plain = pipe("a red fox in the snow", height=SIDE, width=SIDE, num_inference_steps=3,
                 noise=torch.randn(1, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(1)),
                 output_type="latent", progress_bar_cmd=lambda steps: steps)
    pipe.load_lora(pipe.dit, str(saved))
    noise = torch.randn(1, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = pipe("a red fox in the snow", height=SIDE, width=SIDE, num_inference_steps=3, noise=noise,
                output_type="latent", progress_bar_cmd=lambda steps: steps)
    reference = reference_pipeline21(repo)
    reference.load_lora_weights(str(saved))
    with torch.no_grad():
        expected = reference(prompt="a red fox in the snow", height=SIDE, width=SIDE, num_inference_steps=3,
                             latents=noise.flatten(2).transpose(1, 2), output_type="latent").images
    assert rel_err(ours.flatten(2).transpose(1, 2), expected) <= 1e-4
    assert rel_err(ours, plain) > 1e-3  # the LoRA changed the result


def test_full_training_saves_names_diffusers_loads(base, repo, data, tmp_path):
    from diffusers import QwenImage21Transformer2DModel

    config = make_config(repo, data, tmp_path / "out", trainable_models="dit", max_steps=2, learning_rate=1e-4)
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    trainer.run()
    kind, model = load_model([trainer.last_saved], dtype=torch.float32)
    assert kind == "dit" and type(model) is type(base.dit)
    assert all(torch.equal(t, trainer.dit.state_dict()[n]) for n, t in model.state_dict().items())
    assert any(not torch.equal(t, base.dit.state_dict()[n]) for n, t in model.state_dict().items())
    reference = QwenImage21Transformer2DModel.from_pretrained(repo / "transformer")
    from safetensors.torch import load_file

    missing, unexpected = reference.load_state_dict(load_file(trainer.last_saved), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("freqs")]


def test_rows_and_settings_21_cannot_take(repo, data, tmp_path):
    many = [f"edit{k % 2}.png" for k in range(11)]
    write_dataset(data, extra=[{"image": "target0.png", "prompt": "eleven", "edit_image": many},
                               {"image": ["target0.png", "target1.png"], "prompt": "two targets"}])
    config = make_config(repo, data, tmp_path / "out")
    eleven, listed = load_row(config, 2), load_row(config, 3)
    assert isinstance(eleven, Skipped) and "1 to 10 images; this row has 11" in eleven.reason
    assert isinstance(listed, Skipped) and "holds a list" in listed.reason
    row = load_row(config, 0)
    assert row["image"].mode == "RGBA" and [im.mode for im in row["edit_image"]] == ["RGBA", "RGBA"]
    for overrides, message in [
        (dict(extra_inputs=("context_image",), data=dict(data_file_keys=("image", "context_image"))),
         r"extra_inputs \['context_image'\] are not Qwen-Image 2.1's"),
        (dict(trainable_models="blockwise_controlnet", extra_inputs=("blockwise_controlnet_image",),
              remove_prefix_in_ckpt="pipe.blockwise_controlnet.models.0.",
              data=dict(data_file_keys=("image", "blockwise_controlnet_image"))), "Qwen-Image 2.1 trains a LoRA"),
    ]:
        with pytest.raises(ValueError, match=message):
            Trainer(make_config(repo, data, tmp_path / "out", **overrides), progress_bar=False)


def test_the_seeds_command_line_trains_21(repo, data, tmp_path, capsys):
    paths = model_paths(repo)
    args = ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.json"),
            "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image",
            "--model_paths", json.dumps([list(paths[0]), *paths[1:]]), "--processor_path", str(repo / "processor"),
            "--lora_base_model", "dit", "--lora_target_modules", "to_q,to_k,to_v,to_out.0", "--lora_rank", "4",
            "--max_steps", "2", "--output_path", str(tmp_path / "out"), "--device", "cpu"]
    assert cli_main(args) == 0
    saved = list((tmp_path / "out").glob("*.safetensors"))
    assert len(saved) == 1 and "trained 2 steps" in capsys.readouterr().out


def test_training_from_the_sample_cache_equals_encoding_each_step(base, repo, data, tmp_path):
    """--cache: 2.1 samples (prefix runs with ImageBlocks, edit tokens) survive the cache files; same weights."""
    results = []
    for name, cache in (("plain", None), ("cached", str(tmp_path / "cache"))):
        config = make_config(repo, data, tmp_path / name, max_steps=2, cache_dir=cache)
        trainer = Trainer(config, components=fresh(base), progress_bar=False)
        trainer.run()
        results.append({n: p.detach().clone() for n, p in trainer.dit.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys() and results[0]
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_example_scripts_run_as_written(repo, tmp_path, monkeypatch, kind):
    """examples/model_training/{lora,full}/Qwen-Image-2.1.sh with the hub files on disk, one step on the CPU; then
    validate_lora/Qwen-Image-2.1.py renders with the LoRA."""
    import runpy

    from test_training_data import write_dataset as write_rgb_dataset

    write_rgb_dataset(tmp_path / "data" / "example_image_dataset", sizes=((SIDE, SIDE), (SIDE, 48)))
    validate = run_training_example(tmp_path, monkeypatch, {"Qwen-Image-2.1": repo}, kind, "Qwen-Image-2.1")
    if kind == "full":
        return
    monkeypatch.setenv("QISTUDIO_EXAMPLE_SIZE", str(SIDE))
    namespace = runpy.run_path(str(validate), run_name="__main__")
    assert len(namespace["pipe"].list_loras()) == 1
    with Image.open(tmp_path / "image.png") as image:
        assert image.mode == "RGBA" and image.size == (SIDE, SIDE)


TORCH_CHECKPOINT = torch.utils.checkpoint.checkpoint  # the unpatched one, however often a test patches it


def counting_checkpoints(monkeypatch, dit) -> list[tuple[str, int]]:
    """Records (pass, block index) of every block the 2.1 DiT runs under torch's checkpoint: "joint" (training's
    pass: block, prefix..., target=...), "prefill" (_call_eagerly, block, ...) or "target" (block, ...)."""
    calls = []
    index_of = {id(block): k for k, block in enumerate(dit.transformer_blocks)}

    def checkpoint(function, *args, **kwargs):
        if not isinstance(function, torch.nn.Module):
            calls.append(("prefill", index_of[id(args[0])]))
        else:
            calls.append(("joint" if kwargs.get("target") is not None else "target", index_of[id(function)]))
        return TORCH_CHECKPOINT(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    return calls


TEXT_TO_IMAGE = JointLayout((11,), ImageBlock(4, 6))
EDIT = JointLayout((5, ImageBlock(4, 6), 3, ImageBlock(2, 6), 7), ImageBlock(6, 4))  # two edit images


@pytest.mark.parametrize("causal_condition", [True, False], ids=["causal-condition", "step-modulated-prefix"])
@pytest.mark.parametrize("layout", [TEXT_TO_IMAGE, EDIT], ids=["text-to-image", "two-edit-images"])
def test_the_joint_training_pass_equals_prefill_then_forward(layout, causal_condition, monkeypatch):
    """QwenImage21DiT.joint (training's pass: each block once over the prefix and the target, so FSDP2's per-block
    hooks fire once a step, in block order) against the inference passes (prefill, then forward over the cache):
    the velocity and every parameter's gradient are bit-equal, without checkpointing, with every block
    checkpointed and with the first of three (--checkpointed_blocks 1), each checkpointed block one joint call."""
    torch.manual_seed(0)
    config = DiT21Config(num_layers=3, num_heads=2, head_dim=32, in_channels=LATENT_CHANNELS,
                         out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, axes_dim=(8, 12, 12),
                         causal_condition=causal_condition)
    dit = QwenImage21DiT(config)
    with torch.no_grad():
        for parameter in dit.parameters():  # the zero-centred and RMS norms away from their identity start
            parameter.add_(0.1 * torch.randn_like(parameter))
    text, condition, target = random_inputs(layout, batch=1)
    timestep = torch.tensor([0.6])

    def step(pass_, checkpointed):
        model = copy.deepcopy(dit)
        model.gradient_checkpointing = checkpointed != "off"
        model.checkpointed_blocks = None if checkpointed == "off" else checkpointed
        calls = counting_checkpoints(monkeypatch, model)
        if pass_ == "joint":
            velocity = model.joint(text, condition, layout, target, timestep)
        else:
            step_timestep = None if causal_condition else timestep
            velocity = model(target, timestep, model.prefill(text, condition, layout, step_timestep))
        velocity.square().mean().backward()
        return velocity.detach(), {name: p.grad for name, p in model.named_parameters()}, calls

    expected, expected_grads, _ = step("two passes", "off")
    assert all(g is not None and bool(g.any()) for g in expected_grads.values()) and len(expected_grads) > 20
    for checkpointed, blocks in (("off", []), (None, [0, 1, 2]), (1, [0])):
        velocity, grads, calls = step("joint", checkpointed)
        assert calls == [("joint", k) for k in blocks], (checkpointed, calls)
        assert torch.equal(velocity, expected), checkpointed
        assert all(torch.equal(grads[name], g) for name, g in expected_grads.items()), checkpointed


def test_checkpointed_blocks_checkpoints_the_first_n_blocks(base, repo, data, tmp_path, monkeypatch):
    """--checkpointed_blocks N on the 2.1 DiT (once ignored): the first N blocks' joint calls (prefix and target)
    run under checkpoint, the others keep their activations; the loss and every parameter's gradient are those of
    checkpointing every block (and of none). The trainer hands the setting to the 2.1 DiT."""
    sample = encode_qwen21(base, load_row(make_config(repo, data, tmp_path / "out"), 0), "cpu", torch.float32)
    assert sample.condition is not None  # a prefix with edit images
    generator = torch.Generator().manual_seed(3)
    sigma, weight = draw_sigma(LossConfig(), generator, sample.num_target_tokens)
    noise = torch.randn(sample.latents.shape, generator=generator)
    layers = base.dit.config.num_layers
    assert layers >= 2
    results = {}
    for n in (None, 1, 0, "off"):
        dit = copy.deepcopy(base.dit).train().requires_grad_(True)
        dit.gradient_checkpointing, dit.checkpointed_blocks = n != "off", None if n == "off" else n
        calls = counting_checkpoints(monkeypatch, dit)
        loss = flow_matching_loss(Denoiser(dit), sample, sigma, noise, weight)
        loss.backward()
        first = {"off": 0, None: layers}.get(n, n)
        assert calls == [("joint", k) for k in range(first)], (n, calls)
        results[n] = float(loss.detach()), {name: p.grad for name, p in dit.named_parameters()}
    reference_loss_value, reference_grads = results[None]
    assert all(g is not None for g in reference_grads.values()) and len(reference_grads) > 20
    for n in (1, 0, "off"):
        loss_value, grads = results[n]
        assert loss_value == reference_loss_value
        assert all(torch.allclose(grads[name], g, rtol=1e-6, atol=1e-8) for name, g in reference_grads.items()), n

    config = make_config(repo, data, tmp_path / "run", max_steps=1, use_gradient_checkpointing=True,
                         checkpointed_blocks=1)
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    calls = counting_checkpoints(monkeypatch, trainer.dit)
    trainer.run()
    assert trainer.dit.checkpointed_blocks == 1 and calls == [("joint", 0)]
