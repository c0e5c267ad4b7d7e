"""Training every model of the seed's table on the tiny models (CPU): Edit, In-Context, Blockwise ControlNet (full,
Inpaint, and a LoRA on the DiT beside it) and EliGen each train; the training prediction is the pipeline's velocity
for the same inputs; a trained ControlNet saves in the released layout and reloads to the same output."""

import contextlib
import copy
import csv
import dataclasses
import json
import re
import runpy

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from conftest import checkpoint_listing, rel_err
from lora_files import peft_layout, random_pairs
from qistudio import ControlNetInput, ModelConfig, QwenImagePipeline
from qistudio.cli.main import main
from qistudio.components import load_components
from qistudio.models.controlnet import QwenImageBlockwiseControlNet
from qistudio.ops.packing import patchify
from qistudio.training import DEFAULT_LORA_TARGETS, DataConfig, TrainConfig, Trainer
from qistudio.training.data import ImageDataset
from qistudio.training.encode import encode_sample
from qistudio.training.loss import Denoiser, predict
from qistudio.weights.build import load_model
from test_control import write_controlnet
from test_training import model_paths
from test_training_cli import EXAMPLES, script_arguments
from test_training_data import write_image
from tiny_models import reference_dit

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 48, 32  # the target images (and their control maps and masks)
QUIET = dict(progress_bar_cmd=lambda x: x, output_type="latent")


def region(box, size=(W, H)) -> Image.Image:
    """A white rectangle (left, top, right, bottom in pixels) on black."""
    mask = Image.new("RGB", size)
    ImageDraw.Draw(mask).rectangle(box, fill=(255, 255, 255))
    return mask


def write_variant_dataset(folder):
    """Two samples with every extra input (json: lists for the entities); the second has no context image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(2):
        write_image(folder / f"img{k}.png", W, H, seed=k)
        write_image(folder / f"map{k}.png", W, H, seed=10 + k)
        write_image(folder / f"source{k}.png", 40, 40, seed=20 + k)
        region((8, 8, 31, 23)).save(folder / f"hole{k}.png")
        region((0, 0, 23, 31)).save(folder / f"left{k}.png")
        region((24, 0, 47, 15)).save(folder / f"corner{k}.png")
        rows.append({"image": f"img{k}.png", "prompt": f"a house {k}", "edit_image": f"source{k}.png",
                     "context_image": f"map{k}.png" if k == 0 else None, "blockwise_controlnet_image": f"map{k}.png",
                     "blockwise_controlnet_inpaint_mask": f"hole{k}.png",
                     "eligen_entity_prompts": ["a red door", "a cloud"],
                     "eligen_entity_masks": [f"left{k}.png", f"corner{k}.png"]})
    (folder / "metadata.json").write_text(json.dumps(rows))
    return folder


FULL_CONTROLNET = dict(trainable_models="blockwise_controlnet",
                       remove_prefix_in_ckpt="pipe.blockwise_controlnet.models.0.")
# extra_inputs of each variant; its data_file_keys are "image" and the file inputs among them.
VARIANTS = {
    "edit": ("edit_image",),
    "context": ("context_image",),
    "controlnet": ("blockwise_controlnet_image",),
    "inpaint": ("blockwise_controlnet_image", "blockwise_controlnet_inpaint_mask"),
    "eligen": ("eligen_entity_prompts", "eligen_entity_masks"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_variant_dataset(tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Tiny random Blockwise ControlNets in the released layout: (canny path, inpaint path)."""
    folder = tmp_path_factory.mktemp("nets")
    canny = write_controlnet(folder / "canny.safetensors")
    return canny, write_controlnet(folder / "inpaint.safetensors", inpaint=True, seed=1)


@pytest.fixture(scope="module")
def base(tiny_repo):
    return load_components([ModelConfig(path=list(p) if isinstance(p, tuple) else p) for p in model_paths(tiny_repo)],
                           ModelConfig(path=str(tiny_repo / "tokenizer")),
                           ModelConfig(path=str(tiny_repo / "processor")), torch.float32, "cpu")


@pytest.fixture(autouse=True)
def small_edit_latents(monkeypatch):
    import qistudio.conditioning.edit as edit_module

    monkeypatch.setattr(edit_module, "EDIT_LATENT_AREA", 64 * 64)  # a tiny model needs no 1024x1024 edit latents


def with_controlnet(base, path=None):
    """Components of their own (training changes the DiT or the ControlNet in place), with the ControlNet at path."""
    nets = [] if path is None else [load_model([path], dtype=torch.float32, device="cpu")[1]]
    return dataclasses.replace(base, dit=copy.deepcopy(base.dit), controlnets=nets)


def make_config(repo, data_dir, output, extra_inputs, **overrides) -> TrainConfig:
    file_keys = ("image", *(k for k in extra_inputs if k != "eligen_entity_prompts"))
    data = DataConfig(str(data_dir), str(data_dir / "metadata.json"), data_file_keys=file_keys)
    defaults = dict(output_path=str(output), model_paths=model_paths(repo), tokenizer_path=str(repo / "tokenizer"),
                    processor_path=str(repo / "processor"), extra_inputs=extra_inputs, lora_base_model="dit",
                    lora_rank=4, learning_rate=1e-3, num_epochs=2, max_steps=3, device="cpu")
    if "trainable_models" in overrides:
        defaults.pop("lora_base_model")
    return TrainConfig(data, **{**defaults, **overrides})


def train(components, config) -> Trainer:
    trainer = Trainer(config, components=components, progress_bar=False)
    trainer.run()
    return trainer


def sample_of(data_dir, extra_inputs, index=0) -> dict:
    file_keys = ("image", *(k for k in extra_inputs if k != "eligen_entity_prompts"))
    return ImageDataset(DataConfig(str(data_dir), str(data_dir / "metadata.json"), data_file_keys=file_keys))[index]


def trigger_note(variant: str):
    """In-Context prompts get the pipeline's trigger prefix, with its note."""
    return pytest.warns(UserWarning, match="Context_Control") if variant == "context" else contextlib.nullcontext()


def states(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("variant, trains", [("edit", "lora"), ("context", "lora"), ("controlnet", "lora"),
                                             ("controlnet", "controlnet"), ("inpaint", "controlnet"),
                                             ("eligen", "lora")])
def test_each_variant_trains_a_few_steps(base, tiny_repo, data, nets, tmp_path, variant, trains):
    """Finite losses; only what trains moves (the DiT stays frozen under a ControlNet, and the other way round)."""
    net = {"controlnet": nets[0], "inpaint": nets[1]}.get(variant)
    components = with_controlnet(base, net)
    options = dict(learning_rate=1e-2, **FULL_CONTROLNET) if trains == "controlnet" else {}
    dit_before = states(components.dit)
    net_before = states(components.controlnets[0]) if components.controlnets else {}
    with trigger_note(variant):
        trainer = train(components, make_config(tiny_repo, data, tmp_path, VARIANTS[variant], **options))
    assert trainer.progress.step == 3 and all(np.isfinite(r.loss) for r in trainer.history)
    dit_moved = any("lora_B" in k and v.abs().sum() > 0 for k, v in components.dit.state_dict().items())
    assert dit_moved == (trains == "lora")
    if trains == "controlnet":
        assert all(torch.equal(v, dit_before[k]) for k, v in components.dit.state_dict().items())
        after = components.controlnets[0].state_dict()
        assert all(not torch.equal(after[k], net_before[k]) for k in net_before if k.endswith("_proj.weight"))
    elif net_before:
        assert all(torch.equal(v, net_before[k]) for k, v in components.controlnets[0].state_dict().items())


@pytest.mark.parametrize("variant", ["controlnet", "inpaint", "eligen", "context"])
def test_the_training_prediction_is_the_pipelines_velocity(base, data, nets, variant):
    """The same sample through the trainer (dataset -> encode -> Denoiser) and through `pipe(...)` with the same
    inputs as keyword arguments: one Euler step from sigma 0.63 gives back the same velocity."""
    components = with_controlnet(base, {"controlnet": nets[0], "inpaint": nets[1]}.get(variant))
    extra = VARIANTS[variant]
    sample = sample_of(data, extra)
    with trigger_note(variant):
        encoded = encode_sample(components, sample, extra, None, "cpu", torch.float32)
    sigma = 0.63
    noise = torch.randn(encoded.latents.shape, generator=torch.Generator().manual_seed(5))
    noisy = (1 - torch.tensor(sigma)) * encoded.latents + torch.tensor(sigma) * noise
    with torch.no_grad():
        prediction = predict(Denoiser(components.dit, components.controlnets), encoded, noisy, torch.tensor(sigma))
    kwargs = {
        "controlnet": dict(blockwise_controlnet_inputs=[ControlNetInput(image=sample["blockwise_controlnet_image"])]),
        "inpaint": dict(blockwise_controlnet_inputs=[ControlNetInput(
            image=sample["blockwise_controlnet_image"], inpaint_mask=sample["blockwise_controlnet_inpaint_mask"])]),
        "eligen": dict(eligen_entity_prompts=sample["eligen_entity_prompts"],
                       eligen_entity_masks=sample["eligen_entity_masks"]),
        "context": dict(context_image=sample["context_image"]),
    }[variant]
    pipe = QwenImagePipeline(components, "cpu", torch.float32)
    with trigger_note(variant):
        out = pipe(sample["prompt"], input_image=sample["image"], sigmas=[sigma], noise=noise, cfg_scale=1.0,
                   height=H, width=W, **kwargs, **QUIET)
    start = (1 - sigma) * encoded.latents + sigma * noise
    velocity = (start - out) / sigma
    assert rel_err(prediction, patchify(velocity)) <= 1e-5
    if variant in ("controlnet", "inpaint"):  # the ControlNet does something here
        without = predict(components.dit, dataclasses.replace(encoded, controls=[]), noisy, torch.tensor(sigma))
        assert rel_err(without, prediction) > 1e-3
    if variant == "eligen":
        assert encoded.sequence.text.segments is not None and encoded.sequence.attention_mask is not None
    if variant == "context":
        assert encoded.sequence.condition_tokens.shape[1] == encoded.num_target_tokens  # one context group


def released_names(keys) -> set[str]:
    return {re.sub(r"controlnet_blocks\.\d+\.", "controlnet_blocks.N.", k) for k in keys}


def test_a_new_controlnet_trains_from_zero_and_reloads_to_the_same_output(base, tiny_repo, data, tmp_path):
    """No ControlNet among the models: a zero-initialised Inpaint one is made, trained, saved under the released
    file's names, and loads back through ModelConfig(path=...) to give what the trained one gave."""
    components = with_controlnet(base)
    config = make_config(tiny_repo, data, tmp_path / "out", VARIANTS["inpaint"], learning_rate=1e-2,
                         lr_scheduler="constant", max_steps=4, **FULL_CONTROLNET)
    trainer = Trainer(config, components=components, progress_bar=False)
    net = components.controlnets[0]
    assert isinstance(net, QwenImageBlockwiseControlNet) and net.config.additional_in_channels == 4
    assert not net.img_in.weight.any() and not net.controlnet_blocks[1].output_proj.weight.any()
    trainer.run()
    assert net.img_in.weight.any() and net.controlnet_blocks[1].output_proj.weight.any()  # gradients reached both
    saved = load_file(tmp_path / "out" / "epoch-1.safetensors")
    assert released_names(saved) == released_names(checkpoint_listing("qwen_image_blockwise_controlnet_inpaint"))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    reloaded = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[*(ModelConfig(path=str(tiny_repo / name)) for name in ("transformer", "text_encoder", "vae")),
                       ModelConfig(path=str(tmp_path / "out" / "epoch-1.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    sample = sample_of(data, VARIANTS["inpaint"])
    control = [ControlNetInput(image=sample["blockwise_controlnet_image"],
                               inpaint_mask=sample["blockwise_controlnet_inpaint_mask"])]
    kwargs = dict(height=H, width=W, num_inference_steps=2, cfg_scale=1.0, seed=1, blockwise_controlnet_inputs=control,
                  **QUIET)
    trained = QwenImagePipeline(dataclasses.replace(base, controlnets=[net]), "cpu", torch.float32)
    expected = trained("a house", **kwargs)
    assert torch.equal(reloaded("a house", **kwargs), expected)
    plain = QwenImagePipeline(base, "cpu", torch.float32)("a house", **{**kwargs, "blockwise_controlnet_inputs": None})
    assert rel_err(plain, expected) > 1e-4  # the trained ControlNet steers


def test_a_controlnet_run_resumes(base, tiny_repo, data, nets, tmp_path):
    """Checkpoints hold the ControlNet's own tensors; a resumed run ends where a straight one does."""
    options = dict(save_steps=1, max_steps=2, **FULL_CONTROLNET)
    straight = make_config(tiny_repo, data, tmp_path / "a", VARIANTS["controlnet"], **options)
    train(with_controlnet(base, nets[0]), straight)
    config = make_config(tiny_repo, data, tmp_path / "b", VARIANTS["controlnet"], **{**options, "max_steps": 1})
    train(with_controlnet(base, nets[0]), config)
    resumed = Trainer(dataclasses.replace(config, max_steps=2), components=with_controlnet(base, nets[0]),
                      resume="latest", progress_bar=False)
    assert resumed.progress.step == 1
    resumed.run()
    final = [load_file(tmp_path / run / "step-2.safetensors") for run in ("a", "b")]
    assert set(final[0]) == set(final[1]) and all(torch.allclose(final[0][k], final[1][k], atol=1e-6) for k in final[0])


def test_list_file_keys_load_element_wise_and_context_is_optional(data):
    extra = ("context_image", "eligen_entity_prompts", "eligen_entity_masks")
    first, second = sample_of(data, extra, 0), sample_of(data, extra, 1)
    assert [m.size for m in first["eligen_entity_masks"]] == [(W, H), (W, H)]
    assert first["context_image"].size == (W, H) and second["context_image"] is None
    assert first["eligen_entity_prompts"] == ["a red door", "a cloud"]  # text passes through


@pytest.mark.parametrize("overrides, message", [
    (dict(extra_inputs=("eligen_entity_prompts",)), "EliGen needs both"),
    (dict(extra_inputs=("blockwise_controlnet_inpaint_mask",)), "needs blockwise_controlnet_image too"),
    (dict(extra_inputs=("edit_image",), trainable_models="blockwise_controlnet"), "needs the control maps"),
    (dict(extra_inputs=("eligen_entity_prompts", "eligen_entity_masks", "context_image")), "not supported"),
    (dict(extra_inputs=("blockwise_controlnet_image",), trainable_models="blockwise_controlnet",
          remove_prefix_in_ckpt="pipe.dit."), r"would strip nothing; use --remove_prefix_in_ckpt pipe\.blockwise"),
    (dict(extra_inputs=("blockwise_controlnet_image",), lora_base_model="blockwise_controlnet"),
     "put the LoRA on the DiT"),
])  # fmt: skip
def test_input_mistakes_are_caught_before_loading(tiny_repo, data, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tiny_repo, data, tmp_path, **overrides).check()


def test_text_inputs_are_not_file_keys(tiny_repo, data, tmp_path):
    config = make_config(tiny_repo, data, tmp_path, VARIANTS["eligen"])
    keys = ("image", "eligen_entity_masks", "eligen_entity_prompts")
    with pytest.raises(ValueError, match="are text, not files"):
        dataclasses.replace(config, data=dataclasses.replace(config.data, data_file_keys=keys)).check()


@pytest.mark.parametrize("variant, which, message", [
    ("controlnet", None, "needs a Blockwise ControlNet among the models"),
    ("controlnet", "inpaint", "is an Inpaint ControlNet: add blockwise_controlnet_inpaint_mask"),
    ("inpaint", "canny", "has no mask channel"),
])  # fmt: skip
def test_controlnet_mistakes_are_caught_after_loading(base, tiny_repo, data, nets, tmp_path, variant, which, message):
    components = with_controlnet(base, {"canny": nets[0], "inpaint": nets[1]}.get(which))
    with pytest.raises(ValueError, match=message):
        Trainer(make_config(tiny_repo, data, tmp_path, VARIANTS[variant]), components=components, progress_bar=False)


def test_one_controlnet_trains_at_a_time(base, tiny_repo, data, nets, tmp_path):
    one = with_controlnet(base, nets[0])
    two = dataclasses.replace(one, controlnets=one.controlnets * 2)
    config = make_config(tiny_repo, data, tmp_path, VARIANTS["controlnet"], **FULL_CONTROLNET)
    with pytest.raises(ValueError, match="trains one ControlNet, but 2 are loaded"):
        Trainer(config, components=two, progress_bar=False)


# -- the example scripts of the seed's table, run as written ---------------------------------------------------------
EXAMPLE_SCRIPTS = [
    ("full", "Qwen-Image-Edit"), ("lora", "Qwen-Image-Edit"), ("full", "Qwen-Image-Distill-Full"),
    ("lora", "Qwen-Image-Distill-Full"), ("full", "Qwen-Image-Blockwise-ControlNet-Canny"),
    ("lora", "Qwen-Image-Blockwise-ControlNet-Canny"), ("full", "Qwen-Image-Blockwise-ControlNet-Depth"),
    ("lora", "Qwen-Image-Blockwise-ControlNet-Depth"), ("full", "Qwen-Image-Blockwise-ControlNet-Inpaint"),
    ("lora", "Qwen-Image-Blockwise-ControlNet-Inpaint"), ("lora", "Qwen-Image-EliGen"),
    ("lora", "Qwen-Image-In-Context-Control-Union"),
]


def write_example_dataset(folder):
    """The seed's example dataset as the scripts and validate scripts read it, in tiny images."""
    for sub in ("edit", "canny", "depth", "inpaint", "eligen"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for k in range(2):
        write_image(folder / f"image{k}.png", W, H, seed=k)
        write_image(folder / f"map{k}.png", W, H, seed=10 + k)
        region((8, 8, 31, 23)).save(folder / f"mask{k}.png")
    write_image(folder / "edit" / "image1.jpg", 40, 40, seed=3)
    for sub in ("canny", "depth", "inpaint"):
        write_image(folder / sub / "image_1.jpg", 64, 64, seed=4)
    region((16, 16, 47, 47), (64, 64)).save(folder / "inpaint" / "mask.jpg")
    for i, box in enumerate([(0, 0, 31, 31), (32, 0, 63, 31), (0, 32, 31, 63), (32, 32, 63, 63)]):
        region(box, (64, 64)).save(folder / "eligen" / f"{i}.png")
    rows = [{"image": f"image{k}.png", "prompt": f"a house {k}"} for k in range(2)]
    tables = {
        "metadata.csv": rows,
        "metadata_edit.csv": [dict(r, edit_image="edit/image1.jpg") for r in rows],
        "metadata_in_context.csv": [dict(r, context_image="map0.png" if k == 0 else "") for k, r in enumerate(rows)],
        **{f"metadata_blockwise_controlnet_{kind}.csv": [dict(r, blockwise_controlnet_image=f"map{k}.png",
                                                              blockwise_controlnet_inpaint_mask=f"mask{k}.png")
                                                         for k, r in enumerate(rows)]
           for kind in ("canny", "depth", "inpaint")},
    }
    for name, table in tables.items():
        with open(folder / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    entities = [dict(r, eligen_entity_prompts=["a door", "a cloud"], eligen_entity_masks=[f"mask{k}.png", "mask1.png"])
                for k, r in enumerate(rows)]
    (folder / "metadata_eligen.json").write_text(json.dumps(entities))


@pytest.fixture
def example_hub(tiny_repo, tmp_path, monkeypatch):
    """models/<repo> -> tiny models for every repository the scripts name, the example dataset, cwd = tmp_path."""
    models = tmp_path / "models"
    (models / "Qwen").mkdir(parents=True)
    for name in ("Qwen-Image", "Qwen-Image-Edit"):
        (models / "Qwen" / name).symlink_to(tiny_repo, target_is_directory=True)
    studio = models / "DiffSynth-Studio"
    studio.mkdir()
    (studio / "Qwen-Image-Distill-Full").symlink_to(tiny_repo / "transformer", target_is_directory=True)
    for kind in ("Canny", "Depth", "Inpaint"):
        (studio / f"Qwen-Image-Blockwise-ControlNet-{kind}").mkdir()
        write_controlnet(studio / f"Qwen-Image-Blockwise-ControlNet-{kind}" / "model.safetensors",
                         inpaint=kind == "Inpaint")
    # The released In-Context LoRA the script continues from: rank 64 on the standard targets, DiffSynth's layout.
    targets = [f"transformer_blocks.{b}.{'attn.' if m.startswith(('to_', 'add_')) else ''}{m}"
               for b in range(2) for m in DEFAULT_LORA_TARGETS]
    (studio / "Qwen-Image-In-Context-Control-Union").mkdir()
    save_file(peft_layout(random_pairs(reference_dit(), targets, rank=64), adapter="default", alpha=None),
              str(studio / "Qwen-Image-In-Context-Control-Union" / "model.safetensors"))
    write_example_dataset(tmp_path / "data" / "example_image_dataset")
    monkeypatch.chdir(tmp_path)
    for name, value in dict(QISTUDIO_MODEL_BASE_PATH=str(models), QISTUDIO_SKIP_DOWNLOAD="1",
                            QISTUDIO_EXAMPLE_DEVICE="cpu", QISTUDIO_EXAMPLE_STEPS="1",
                            QISTUDIO_EXAMPLE_SIZE="32").items():
        monkeypatch.setenv(name, value)
    return tmp_path


@pytest.mark.parametrize("kind, name", EXAMPLE_SCRIPTS)
def test_example_scripts_train_and_validate(example_hub, monkeypatch, kind, name):
    """Each script of the seed's table, one step on the CPU, then its validate script renders with the result."""
    args = script_arguments(EXAMPLES / kind / f"{name}.sh")
    workers = ["--dataset_num_workers", "0"] if "--dataset_num_workers" in args else []
    with trigger_note("context" if "In-Context" in name else name):
        assert main(args + ["--max_steps", "1", "--device", "cpu", *workers]) == 0
    saved = example_hub / "models" / "train" / f"{name}_{kind}" / "step-1.safetensors"
    keys = set(load_file(saved))
    if kind == "lora":
        assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    elif "ControlNet" in name:
        assert released_names(keys) == released_names(checkpoint_listing(
            "qwen_image_blockwise_controlnet_inpaint" if "Inpaint" in name else "qwen_image_blockwise_controlnet"))
    else:
        assert "transformer_blocks.0.attn.to_q.weight" in keys
    script = EXAMPLES / f"validate_{kind}" / f"{name}.py"
    (example_hub / "image.jpg").unlink(missing_ok=True)
    monkeypatch.setenv("QISTUDIO_EXAMPLE_CHECKPOINT", str(saved))
    namespace = runpy.run_path(str(script), run_name="__main__")
    with Image.open(example_hub / "image.jpg") as image:
        assert image.size == (32, 32)
    pipe = namespace["pipe"]
    assert len(pipe.list_loras()) == (1 if kind == "lora" else 0)
    assert len(pipe.controlnets) == (1 if "ControlNet" in name else 0)


def test_validate_renders_with_a_controlnet_checkpoint(tiny_repo, nets, tmp_path, capsys):
    """`qistudio validate` recognises a ControlNet file, loads it beside the base model and needs its control map."""
    from PIL import Image

    from qistudio.cli.main import main
    from qistudio.imageio import read_png_parameters

    control = tmp_path / "edges.png"
    Image.new("RGB", (W, H), (255, 255, 255)).save(control)
    canny, _ = nets
    common = ["validate", str(canny), "--model", str(tiny_repo), "--steps", "1", "--size", f"{W}x{H}", "-o",
              str(tmp_path / "val")]
    with pytest.raises(SystemExit):
        main(common)
    assert "is a ControlNet: give its control map with --control" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--control", str(control), "--inpaint-mask", str(control)])
    assert "--inpaint-mask needs an Inpaint ControlNet" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the Inpaint ControlNet's mask, asked for before anything loads
        main(["validate", str(nets[1]), "--model", str(tmp_path / "nowhere"), "--control", str(control)])
    assert "is an Inpaint ControlNet: give its mask with --inpaint-mask" in capsys.readouterr().err
    assert main(common + ["--control", str(control)]) == 0
    (png,) = (tmp_path / "val").glob("*.png")
    parameters = read_png_parameters(png)
    assert parameters["checkpoint_kind"] == "controlnet" and parameters["control"] == str(control)


def test_validation_images_use_the_first_samples_conditions(base, tiny_repo, data, nets, tmp_path):
    """A ControlNet run renders its validation prompts with the first sample's control map, as pipe(...) would."""
    from qistudio.imageio import read_png_parameters

    canny, _ = nets
    components = with_controlnet(base, canny)
    config = make_config(tiny_repo, data, tmp_path / "out", VARIANTS["controlnet"], max_steps=1,
                         validation_prompts=("a house",), validation_size=(W, H), validation_num_inference_steps=2,
                         validation_cfg_scale=1.0, validation_seed=3, **FULL_CONTROLNET)
    Trainer(config, components=components, progress_bar=False).run()
    (png,) = (tmp_path / "out" / "samples" / "step-1").glob("*.png")
    assert read_png_parameters(png)["conditions"].startswith("blockwise_controlnet_inputs of sample 0")
    sample = sample_of(data, VARIANTS["controlnet"])
    expected = QwenImagePipeline(components, "cpu", torch.float32)(
        "a house", height=H, width=W, num_inference_steps=2, cfg_scale=1.0, seed=3, progress_bar_cmd=lambda x: x,
        blockwise_controlnet_inputs=[ControlNetInput(image=sample["blockwise_controlnet_image"])])
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(expected))
    without = QwenImagePipeline(components, "cpu", torch.float32)(
        "a house", height=H, width=W, num_inference_steps=2, cfg_scale=1.0, seed=3, progress_bar_cmd=lambda x: x)
    assert not np.array_equal(np.asarray(without), np.asarray(expected))  # the control map matters here
