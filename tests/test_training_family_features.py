"""Qwen-Image-Layered and Qwen-Image 2.1 training with the run settings Qwen-Image's trainer has, each against the
plain run as Qwen-Image's own test of the feature compares it (CPU, float32, tiny repositories): an FP8 base trains
exactly as the dequantised base; streamed blocks (--vram_limit) train exactly as resident ones, with FP8 too;
compiled blocks train as eager; FSDP2 (a process group of one) trains the whole DiT as the plain run; validation
images are the pipeline's (Layered: the sample's input image split into its layers; 2.1: with its edit images)."""

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import qistudio.conditioning.layered as layered_inputs
import test_training_layered as layered_tests
import test_training_qwen21 as qwen21_tests
from qistudio import ModelConfig, QwenImagePipeline
from qistudio.components import load_components
from qistudio.imageio import read_png_parameters
from qistudio.memory.fp8_linear import FP8Linear
from qistudio.pipeline21 import pipeline_class
from qistudio.training import Trainer
from tiny_layered import write_tiny_layered
from tiny_qwen21 import model_configs21, tiny_repository21

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["layered", "qwen21"]


@pytest.fixture(scope="module", autouse=True)
def small_working_area():
    """Layered's 640 bucket at 80x80 pixels (its validation images), as the Layered tests shrink it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layered_inputs, "RESOLUTION_AREAS",
                      {k: v // 64 for k, v in layered_inputs.RESOLUTION_AREAS.items()})
        yield


@pytest.fixture(scope="module")
def layered(tiny_repo, tmp_path_factory):
    repo = write_tiny_layered(tmp_path_factory.mktemp("Qwen-Image-Layered"), tiny_repo)
    base = load_components([ModelConfig(path=list(p) if isinstance(p, tuple) else p)
                            for p in layered_tests.model_paths(repo)],
                           ModelConfig(path=str(repo / "tokenizer")), None, torch.float32, "cpu")
    return SimpleNamespace(repo=repo, base=base, write=layered_tests.write_layered_dataset,
                           config=layered_tests.make_config, validation_size=(640, 640))


@pytest.fixture(scope="module")
def qwen21(tmp_path_factory):
    repo = tiny_repository21(tmp_path_factory)
    base = load_components(model_configs21(repo), None, ModelConfig(path=str(repo / "processor")), torch.float32,
                           "cpu")
    return SimpleNamespace(repo=repo, base=base, write=qwen21_tests.write_dataset, config=qwen21_tests.make_config,
                           validation_size=(64, 64))


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path):
    """One family's tiny repository, loaded models, dataset (in tmp_path/data) and config maker."""
    chosen = request.getfixturevalue(request.param)
    chosen.name = request.param
    chosen.data = tmp_path / "data"
    chosen.write(chosen.data)
    return chosen


def fresh(base):
    return dataclasses.replace(base, dit=copy.deepcopy(base.dit))


def train(family, output, components=True, **settings) -> Trainer:
    config = family.config(family.repo, family.data, output, **settings)
    trainer = Trainer(config, components=fresh(family.base) if components else None, progress_bar=False)
    trainer.run()
    return trainer


def assert_trained(trainer: Trainer, saved: dict) -> None:
    """Finite losses; the saved LoRA's up factors (zero at the start) moved."""
    assert all(np.isfinite(r.loss) for r in trainer.history) and len(trainer.history) >= 2
    ups = [t for k, t in saved.items() if "lora_B" in k]
    assert ups and all(torch.isfinite(t).all() for t in saved.values()) and any(t.abs().max() > 0 for t in ups)


def assert_same(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(ours[k], expected[k])]
    assert not different, f"{len(different)} of {len(expected)} differ, first {different[0]}"


# -- low memory: FP8 base, streamed blocks ---------------------------------------------------------------------------
def test_an_fp8_base_trains_as_its_dequantised_base(family, tmp_path):
    """As Qwen-Image's test_trainer_on_an_fp8_base_equals_training_on_the_dequantised_base: equal losses and LoRA."""
    ours = train(family, tmp_path / "fp8", max_steps=2, fp8_base=True)
    quantised = {n.replace(".base_layer", ""): m for n, m in ours.dit.named_modules() if isinstance(m, FP8Linear)}
    assert len(quantised) >= 2 * len(ours.dit.transformer_blocks)
    components = fresh(family.base)
    with torch.no_grad():
        for name, module in components.dit.named_modules():
            if name in quantised:
                module.weight.copy_(quantised[name].dequantized_weight(torch.float32))
    config = family.config(family.repo, family.data, tmp_path / "ref", max_steps=2)
    reference = Trainer(config, components=components, progress_bar=False)
    reference.run()
    assert [r.loss for r in ours.history] == [r.loss for r in reference.history]
    saved = load_file(ours.last_saved)
    assert_same(saved, load_file(reference.last_saved))
    assert_trained(ours, saved)


def test_streamed_blocks_train_as_resident_ones(family, tmp_path):
    """--vram_limit 0 streams every block (2.1: the prefix's pass and the target's), with and without an FP8 base:
    the resident run's losses and LoRA bit for bit (Qwen-Image's test_trainer_streams_to_the_resident_weights)."""
    settings = dict(max_steps=2, use_gradient_checkpointing=True)
    resident = train(family, tmp_path / "resident", **settings)
    streamed = train(family, tmp_path / "streamed", vram_limit=0.0, **settings)
    blocks = len(streamed.dit.transformer_blocks)
    assert streamed.low_memory.streamer is not None and len(streamed.low_memory.streamer.streamed) == blocks
    assert [r.loss for r in streamed.history] == [r.loss for r in resident.history]
    expected = load_file(resident.last_saved)
    assert_same(load_file(streamed.last_saved), expected)
    fp8 = train(family, tmp_path / "fp8", vram_limit=0.0, fp8_base=True, **settings)
    saved = load_file(fp8.last_saved)
    assert saved.keys() == expected.keys()
    assert_trained(fp8, saved)


def test_gradient_checkpointing_trains_as_the_plain_step(family, tmp_path):
    """2.1 checkpoints its prefix's pass too (what streaming needs); both families: the plain run's LoRA."""
    plain = train(family, tmp_path / "plain", max_steps=2)
    checkpointed = train(family, tmp_path / "checkpointed", max_steps=2, use_gradient_checkpointing=True)
    assert [r.loss for r in checkpointed.history] == [r.loss for r in plain.history]
    assert_same(load_file(checkpointed.last_saved), load_file(plain.last_saved))


# -- compile ----------------------------------------------------------------------------------------------------------
def test_compiled_blocks_train_as_eager(family, tmp_path, monkeypatch):
    """--compile (traced without code generation here), with checkpointing and the LoRA inside each block: the eager
    losses within 1e-5 (Qwen-Image's test_compiled_blocks_train_as_eager)."""
    import qistudio.training.loop as loop

    compiled, compile_blocks = [], loop.compile_repeated_blocks

    def trace_only(model, **kwargs):
        compiled.append(compile_blocks(model, backend="aot_eager", **kwargs))

    monkeypatch.setattr(loop, "compile_repeated_blocks", trace_only)
    torch._dynamo.reset()
    settings = dict(max_steps=3, use_gradient_checkpointing=True, seed=2)
    eager = train(family, tmp_path / "eager", **settings)
    traced = train(family, tmp_path / "compiled", compile=True, **settings)
    assert compiled == [len(traced.dit.transformer_blocks)]
    assert [r.loss for r in traced.history] == pytest.approx([r.loss for r in eager.history], rel=1e-5)
    assert_trained(traced, load_file(traced.last_saved))


# -- FSDP2 ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def in_process_group():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_fsdp_trains_the_whole_layered_dit_as_the_plain_run(layered, tmp_path, in_process_group):
    """--fsdp in a process group of one: each block its own FSDP2 unit, filled from the files, gradient
    checkpointing; the saved DiT is the plain run's within Qwen-Image's FSDP tolerance (two AdamW steps of lr apart
    at most), in fact nearly equal."""
    family = layered
    family.data = tmp_path / "data"
    family.write(family.data)
    settings = dict(trainable_models="dit", max_steps=2, learning_rate=1e-4, use_gradient_checkpointing=True)
    sharded = train(family, tmp_path / "fsdp", components=False, fsdp=True, **settings)
    assert sharded.fsdp is not None
    plain = train(family, tmp_path / "plain", **settings)
    ours, expected = load_file(sharded.last_saved), load_file(plain.last_saved)
    assert ours.keys() == expected.keys()
    worst = max(float((ours[k] - expected[k]).abs().max()) for k in ours)
    assert worst <= 2 * 1e-4 * 2 and worst < 1e-6, worst
    assert sharded.history[0].loss == pytest.approx(plain.history[0].loss, rel=1e-6)
    assert any(not torch.equal(ours[k], t) for k, t in fresh(family.base).dit.state_dict().items() if k in ours)


# -- validation images ------------------------------------------------------------------------------------------------
def test_validation_images_are_the_pipelines(family, tmp_path):
    """Rendered at the last step with the trained DiT; equal to the pipeline's own call with the same inputs:
    Layered splits sample 0's input image into its 2 layers (RGBA PNGs, one per layer), 2.1 edits with sample 0's
    two edit images (RGBA)."""
    # 2.1 with --validation_cfg_scale left out: its own default, no guidance (once Qwen-Image's 4.0 with an empty
    # negative prompt, twice the work and not what 2.1 renders).
    cfg = {} if family.name == "qwen21" else dict(validation_cfg_scale=2.0)
    trainer = train(family, tmp_path / "out", max_steps=2, validation_prompts=("a poster",), validation_seed=3,
                    validation_size=family.validation_size, validation_num_inference_steps=2, **cfg)
    folder = tmp_path / "out" / "samples" / "step-2"
    row = trainer.dataset[0]
    pipe = pipeline_class(QwenImagePipeline, trainer.components)(trainer.components, "cpu", torch.float32)
    trainer.dit.eval()
    common = dict(cfg_scale=2.0 if cfg else 1.0, seed=3, num_inference_steps=2, progress_bar_cmd=lambda x: x)
    if family.name == "layered":
        expected = pipe("a poster", image=row["layer_input_image"], layers=2, resolution=640, **common)
        files = [folder / "00-layer-1.png", folder / "00-layer-2.png"]
        conditions = "image, layers, resolution of sample 0"
    else:
        expected = [pipe("a poster", edit_image=row["edit_image"], height=64, width=64, output_resolution=64,
                         **common)]
        files = [folder / "00.png"]
        conditions = "edit_image, output_resolution of sample 0"
    assert sorted(folder.iterdir()) == files
    for path, image in zip(files, expected):
        with Image.open(path) as written:
            assert written.mode == "RGBA" and np.array_equal(np.asarray(written), np.asarray(image))
        assert read_png_parameters(path)["conditions"].startswith(conditions)
        assert read_png_parameters(path)["cfg"] == common["cfg_scale"]



def test_the_low_memory_plan_counts_every_image_a_sample_puts_through_the_dit(family):
    """Layered: 2 layers + the composite + the input image; 2.1: the target and up to two edit images; the
    activation estimate (lowmem.sample_tokens) scales with them."""
    from qistudio.training.data import read_metadata
    from qistudio.training.family import images_per_sample
    from qistudio.training.lowmem import sample_tokens

    config = family.config(family.repo, family.data, family.data / "out", data=dict(height=32, width=32))
    rows = read_metadata(config.data.metadata_path)
    images = images_per_sample(family.name, config, rows)
    assert images == (4 if family.name == "layered" else 3)
    assert sample_tokens(config, images) == images * 4 and sample_tokens(config) < sample_tokens(config, images)
