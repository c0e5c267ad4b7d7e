"""Qwen-Image-Layered training on the tiny Layered repository (CPU): one step's loss and gradients equal
DiffSynth-Studio 2.1.12's own Layered training loss (FlowMatchSFTLoss over its model function, same timestep draw
and noise); a LoRA learns and its file loads back into our Layered pipeline; full training saves the released
names; the seed's command line trains it; rows and settings the model cannot take are refused clearly."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffsynth_reference as reference
from conftest import rel_err
from qistudio import ModelConfig
from qistudio.cli.main import main as cli_main
from qistudio.components import load_components
from qistudio.ops.packing import unpatchify
from qistudio.training import DataConfig, LossConfig, TrainConfig, Trainer
from qistudio.training.data import ImageDataset, Skipped
from qistudio.training.family import LAYERED, data_rules, row_check
from qistudio.training.layered import encode_layered
from qistudio.training.loss import Denoiser, flow_matching_loss
from qistudio.training.timesteps import draw_sigma
from qistudio.weights.build import load_model
from tiny_layered import load_layered_pipe, write_tiny_layered
from tiny_models import AXES, TEXT_DIM

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (48, 32)  # (width, height): 6 x 4 latents, a 3 x 2 patch grid per frame
LAYERS = 2


@pytest.fixture(scope="module")
def layered_repo(tiny_repo, tmp_path_factory):
    return write_tiny_layered(tmp_path_factory.mktemp("Qwen-Image-Layered"), tiny_repo)


def model_paths(repo) -> tuple:
    return (tuple(sorted(str(p) for p in (repo / "transformer").glob("*.safetensors"))), str(repo / "text_encoder"),
            str(repo / "vae" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def base(layered_repo):
    return load_components([ModelConfig(path=list(p) if isinstance(p, tuple) else p)
                            for p in model_paths(layered_repo)],
                           ModelConfig(path=str(layered_repo / "tokenizer")), None, torch.float32, "cpu")


def fresh(base):
    return dataclasses.replace(base, dit=copy.deepcopy(base.dit))


def rgba(path, seed: int, size=SIZE):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(array, "RGBA").save(path)


def write_layered_dataset(folder, rows=2, layers=LAYERS, extra=()) -> str:
    """DiffSynth-Studio's Layered metadata.json: image = [composite, layer 1 (bottom), ...], layer_input_image,
    layer_num, prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for row in range(rows):
        names = [f"s{row}_composite.png"] + [f"s{row}_layer{k}.png" for k in range(1, layers + 1)]
        for k, name in enumerate(names):
            rgba(folder / name, 10 * row + k)
        rgba(folder / f"s{row}_input.png", 10 * row + 9)
        samples.append({"image": names, "layer_input_image": f"s{row}_input.png", "layer_num": layers,
                        "prompt": f"a poster, layer set {row}"})
    samples += list(extra)
    (folder / "metadata.json").write_text(json.dumps(samples))
    return str(folder / "metadata.json")


def make_config(repo, data_dir, output, **overrides) -> TrainConfig:
    data = DataConfig(str(data_dir), str(data_dir / "metadata.json"),
                      **{"data_file_keys": ("image", "layer_input_image"), **overrides.pop("data", {})})
    defaults = dict(output_path=str(output), model_paths=model_paths(repo), tokenizer_path=str(repo / "tokenizer"),
                    extra_inputs=("layer_num", "layer_input_image"), lora_base_model="dit", lora_rank=4,
                    learning_rate=1e-3, device="cpu")
    if "trainable_models" in overrides:
        defaults.pop("lora_base_model")
    return TrainConfig(data, **{**defaults, **overrides})


@pytest.fixture
def data(tmp_path):
    write_layered_dataset(tmp_path / "data")
    return tmp_path / "data"


def load_row(config: TrainConfig, index: int = 0):
    rules = data_rules(LAYERED)
    return ImageDataset(config.data, row_check(config, LAYERED), rules.rgba_keys, rules.list_keys)[index]


def diffsynth_layered_dit(state: dict):
    """DiffSynth's QwenImageDiT in its Layered form (layer-3D RoPE, the extra timestep row) at the tiny size, holding
    `state`; its MLP activation made tanh-GELU as the official model's (diffsynth_reference.use_tanh_gelu)."""
    from diffsynth.models.general_modules import TimestepEmbeddings
    from diffsynth.models.qwen_image_dit import QwenEmbedLayer3DRope

    cfg = reference_config(state)
    dit = reference.tiny_dit(cfg["layers"], cfg["heads"], cfg["head_dim"], TEXT_DIM, AXES)
    dit.pos_embed = QwenEmbedLayer3DRope(theta=10000, axes_dim=list(AXES), scale_rope=True)
    dit.time_text_embed = TimestepEmbeddings(256, cfg["heads"] * cfg["head_dim"], diffusers_compatible_format=True,
                                             scale=1000, align_dtype_to_timestep=False, use_additional_t_cond=True)
    dit.load_state_dict(state, strict=True)
    assert reference.use_tanh_gelu(dit) == 2 * cfg["layers"]
    return dit.float()


def reference_config(state: dict) -> dict:
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    return dict(layers=layers, head_dim=head_dim, heads=state["img_in.weight"].shape[0] // head_dim)


@pytest.mark.parametrize("seed", [3, 11])
def test_loss_and_gradients_equal_diffsynth_layered_training_loss(base, layered_repo, data, tmp_path, seed):
    """Our step (encode_layered -> flow_matching_loss through the Denoiser) against DiffSynth-Studio's
    FlowMatchSFTLoss with its Layered model function: the same encoded sample, the same draw (its global generator
    seeded as ours), so the same timestep, noise and bsmntw weight; loss and every DiT gradient within 1e-5."""
    pipeline = reference.require_diffsynth()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss

    config = make_config(layered_repo, data, tmp_path / "out")
    ours = copy.deepcopy(base.dit).train().requires_grad_(True)
    sample = encode_layered(base, load_row(config), "cpu", torch.float32)
    frames, (height, width) = sample.latents.shape[1], sample.latents.shape[-2:]
    assert frames == LAYERS + 1 and sample.condition.shape == (1, (height // 2) * (width // 2), 64)

    generator = torch.Generator().manual_seed(seed)
    sigma, weight = draw_sigma(LossConfig(), generator, sample.num_target_tokens)
    noise = torch.randn(sample.latents.shape, generator=generator)
    loss = flow_matching_loss(Denoiser(ours), sample, sigma, noise, weight)
    loss.backward()

    theirs = diffsynth_layered_dit({k: v.detach().clone() for k, v in base.dit.state_dict().items()}).train()
    pipe = pipeline.QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = theirs
    pipe.scheduler.set_timesteps(1000, training=True)
    torch.manual_seed(seed)  # FlowMatchSFTLoss draws its timestep index, then its noise, from the global generator
    expected = FlowMatchSFTLoss(
        pipe, input_latents=sample.latents[0], layer_input_latents=unpatchify(sample.condition, height // 2, width // 2),
        layer_num=frames - 1, prompt_emb=sample.text_states,
        prompt_emb_mask=torch.ones(1, sample.text_states.shape[1], dtype=torch.long), height=height * 8,
        width=width * 8)
    expected.backward()
    assert float(weight) > 0 and abs(float(loss) - float(expected)) <= 1e-5 * abs(float(expected))
    reference_grads = dict(theirs.named_parameters())
    pairs = []
    for name, param in ours.named_parameters():
        ref = reference_grads[name].grad
        if ref is None or not ref.any():  # the last block's text stream feeds nothing, in both
            assert param.grad is None or not param.grad.any(), name
            continue
        pairs.append((name, param.grad, ref))
    assert len(pairs) > 20
    # All gradients together within 1e-5 (measured 3e-6). Tensor by tensor, the few whose gradient is ~1e-4 of the
    # others' (the first block's text queries) differ by float32 rounding up to ~1.5e-5: DiffSynth feeds its DiT
    # timestep / 1000 from a float32 table of 1000 sigma, 6e-8 off the sigma both noise with.
    assert rel_err(torch.cat([g.flatten() for _, g, _ in pairs]), torch.cat([r.flatten() for _, _, r in pairs])) <= 1e-5
    assert max(rel_err(g, r) for _, g, r in pairs) <= 1e-4


def train_lowers_the_loss(config: TrainConfig, components):
    """Train; the fixed-noise loss of the first two items must fall by 10% or more. (trainer, saved file)"""
    trainer = Trainer(config, components=components, progress_bar=False)
    before = trainer.evaluate([0, 1])
    trainer.run()
    after = trainer.evaluate([0, 1])
    assert after < 0.9 * before, (before, after)
    assert trainer.last_saved is not None and trainer.last_saved.is_file()
    return trainer, trainer.last_saved


def test_lora_training_learns_and_loads_back_into_the_layered_pipeline(base, layered_repo, data, tmp_path):
    config = make_config(layered_repo, data, tmp_path / "out", max_steps=12, lr_scheduler="constant", learning_rate=1e-2,
                         data=dict(repeat=6))
    trainer, saved = train_lowers_the_loss(config, fresh(base))

    # The file (diffusers layout, transformer.*) in our Layered pipeline computes what the trained DiT computes.
    pipe = load_layered_pipe(layered_repo)
    pipe.load_lora(pipe.dit, str(saved))
    sample = encode_layered(base, load_row(config, 1), "cpu", torch.float32)
    tokens = sample.pack(torch.randn(sample.latents.shape, generator=torch.Generator().manual_seed(0)))
    timestep = torch.tensor([0.4])
    with torch.no_grad():
        trained = sample.velocity(trainer.dit.eval(), tokens, timestep)
        loaded = sample.velocity(pipe.dit, tokens, timestep)
        plain = sample.velocity(base.dit, tokens, timestep)
    assert rel_err(loaded, trained) <= 1e-5
    assert rel_err(plain, trained) > 1e-3  # the LoRA changed something


def test_full_training_saves_the_released_names(base, layered_repo, data, tmp_path):
    config = make_config(layered_repo, data, tmp_path / "out", trainable_models="dit", max_steps=2,
                         learning_rate=1e-4)
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    trainer.run()
    kind, model = load_model([trainer.last_saved], dtype=torch.float32)
    assert kind == "dit" and model.config.use_additional_t_cond and model.config.use_layer3d_rope
    changed = [name for name, tensor in model.state_dict().items()
               if not torch.equal(tensor, base.dit.state_dict()[name])]
    assert changed and all(torch.equal(t, trainer.dit.state_dict()[n]) for n, t in model.state_dict().items())


def test_rows_the_model_cannot_take_are_skipped_with_the_reason(layered_repo, tmp_path):
    folder = tmp_path / "data"
    bad = [
        {"image": "s0_composite.png", "layer_input_image": "s0_input.png", "prompt": "one file"},
        {"image": ["s0_composite.png"], "layer_input_image": "s0_input.png", "prompt": "no layer"},
        {"image": ["s0_composite.png", "s0_layer1.png"], "layer_input_image": "s0_input.png", "layer_num": 3,
         "prompt": "wrong count"},
        {"image": ["s0_composite.png", "small.png"], "layer_input_image": "s0_input.png", "prompt": "sizes"},
    ]
    write_layered_dataset(folder, rows=1, extra=bad)
    rgba(folder / "small.png", 5, size=(32, 32))
    config = make_config(layered_repo, folder, tmp_path / "out")
    reasons = [load_row(config, k) for k in range(1, 5)]
    assert all(isinstance(r, Skipped) for r in reasons)
    assert "holds a list" not in reasons[0].reason and "1 file(s), that is 0 layer(s)" in reasons[0].reason
    assert "0 layer(s)" in reasons[1].reason
    assert "layer_num is 3, but image lists 1 layer(s)" in reasons[2].reason
    assert "one size" in reasons[3].reason and "32x32" in reasons[3].reason
    row = load_row(config, 0)
    assert [im.mode for im in row["image"]] == ["RGBA"] * 3 and row["layer_input_image"].mode == "RGBA"


def test_settings_the_model_cannot_take_stop_before_loading(tiny_repo, layered_repo, data, tmp_path):
    from test_training import model_paths as qwen_image_paths

    no_layers = make_config(layered_repo, data, tmp_path / "a", extra_inputs=(),
                            data=dict(data_file_keys=("image",)))
    with pytest.raises(ValueError, match="layer_input_image.*--data_file_keys image,layer_input_image"):
        Trainer(no_layers, progress_bar=False)
    wrong_model = make_config(tiny_repo, data, tmp_path / "b", model_paths=qwen_image_paths(tiny_repo))
    with pytest.raises(ValueError, match="Qwen-Image-Layered's inputs, but the DiT is Qwen-Image's"):
        Trainer(wrong_model, progress_bar=False)
    with pytest.raises(ValueError, match="validation_size=512x512: Qwen-Image-Layered"):
        Trainer(make_config(layered_repo, data, tmp_path / "c", validation_prompts=("a poster",),
                            validation_size=(512, 512)), progress_bar=False)


def test_the_seeds_command_line_trains_layered(layered_repo, data, tmp_path, capsys):
    """DiffSynth-Studio's Qwen-Image-Layered.sh arguments; the model is told from its files (no new flag)."""
    paths = model_paths(layered_repo)

    def args(output, layer_columns=True):
        columns = ["--data_file_keys", "image,layer_input_image", "--extra_inputs", "layer_num,layer_input_image"]
        return ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.json"),
                *(columns if layer_columns else []), "--model_paths", json.dumps([list(paths[0]), *paths[1:]]),
                "--tokenizer_path", str(layered_repo / "tokenizer"), "--lora_base_model", "dit",
                "--lora_target_modules", "to_q,to_k,to_v,to_out.0", "--lora_rank", "4", "--max_steps", "2",
                "--output_path", str(tmp_path / output), "--device", "cpu"]

    assert cli_main(args("out")) == 0
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["epoch-0.safetensors"]
    capsys.readouterr()
    assert cli_main(args("out2", layer_columns=False)) == 1  # one line naming the fix, status 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qistudio train: Qwen-Image-Layered trains on an input image")


def run_training_example(tmp_path, monkeypatch, repos: dict, kind: str, name: str):
    """The example script model_training/<kind>/<name>.sh as written (less its worker count), for one step on the
    CPU, with `repos` ({"Qwen-Image-Layered": folder, ...}) standing where the hub files are downloaded; returns
    the saved file, with the validation scripts' quick settings set in the environment."""
    from test_training_cli import EXAMPLES, script_arguments

    (tmp_path / "models" / "Qwen").mkdir(parents=True)
    for repo_name, folder in repos.items():
        (tmp_path / "models" / "Qwen" / repo_name).symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for key, value in (("MODEL_BASE_PATH", str(tmp_path / "models")), ("SKIP_DOWNLOAD", "1"),
                       ("EXAMPLE_DEVICE", "cpu"), ("EXAMPLE_STEPS", "1")):
        monkeypatch.setenv(f"QISTUDIO_{key}", value)
    args = script_arguments(EXAMPLES / kind / f"{name}.sh")
    assert cli_main(args + ["--max_steps", "1", "--device", "cpu", "--dataset_num_workers", "0"]) == 0
    saved = tmp_path / "models" / "train" / f"{name}_{kind}" / "step-1.safetensors"
    assert saved.is_file()
    monkeypatch.setenv("QISTUDIO_EXAMPLE_CHECKPOINT", str(saved))
    return EXAMPLES / "validate_lora" / f"{name}.py"


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_example_scripts_run_as_written(tiny_repo, layered_repo, tmp_path, monkeypatch, kind):
    """examples/model_training/{lora,full}/Qwen-Image-Layered.sh with the hub files on disk, one step on the CPU;
    then validate_lora/Qwen-Image-Layered.py splits a picture with the LoRA."""
    import runpy

    import qistudio.conditioning.layered as layered_inputs

    write_layered_dataset(tmp_path / "data" / "diffsynth_example_dataset" / "qwen_image" / "Qwen-Image-Layered")
    validate = run_training_example(tmp_path, monkeypatch, {"Qwen-Image-Layered": layered_repo,
                                                            "Qwen-Image": tiny_repo}, kind, "Qwen-Image-Layered")
    if kind == "full":
        return
    monkeypatch.setattr(layered_inputs, "RESOLUTION_AREAS", {k: v // 64 for k, v in
                                                             layered_inputs.RESOLUTION_AREAS.items()})
    namespace = runpy.run_path(str(validate), run_name="__main__")
    assert len(namespace["pipe"].list_loras()) == 1 and len(namespace["layers"]) == 3
    assert all((tmp_path / f"image_{i}.png").is_file() for i in (1, 2, 3))
