"""Around the training loop: size buckets for several processes, validation images, TensorBoard and CSV logs,
the shipped accelerate/DeepSpeed configs and saving from ZeRO-3-partitioned weights."""

import csv
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT
from qistudio.cli.main import main
from qistudio.imageio import read_png_parameters
from qistudio.training import Trainer
from qistudio.training.adapters import trainable_named_parameters
from qistudio.training.buckets import bucketed_order, buckets_on, item_sizes, row_sizes
from qistudio.training.config import DataConfig
from qistudio.training.data import ImageDataset, epoch_order
from qistudio.training.logs import CSV_FILE, TENSORBOARD_DIR, TrainingLog
from qistudio.training.outputs import exported_state_dict, save_weights
from qistudio.training.zero import gathered_state, holding, prepare_deepspeed, set_boundary
from test_training import base, data, fresh, make_config  # noqa: F401 (fixtures)
from test_training_cli import base_args
from test_training_data import write_dataset

EXAMPLES = ROOT / "examples" / "model_training"

pytestmark = pytest.mark.usefixtures("one_thread")


# -- buckets ----------------------------------------------------------------------------------------------------------
def steps_of(order: list[int], processes: int) -> list[list[int]]:
    """What the processes train together: step s is order[s*P : (s+1)*P] (process r takes item r of each)."""
    return [order[k : k + processes] for k in range(0, len(order), processes)]


@pytest.mark.parametrize("processes", [2, 4])
def test_bucketed_order_gives_every_process_one_size_per_step(processes):
    counts = {(1024, 1024): 9, (768, 1344): 7, (1344, 768): 4, (512, 512): 3, None: 2}  # None: unreadable images
    sizes = [size for size, n in counts.items() for _ in range(n)]
    sizes = [sizes[k] for k in torch.randperm(len(sizes), generator=torch.Generator().manual_seed(1)).tolist()]
    order = bucketed_order(sizes, processes, seed=7, epoch=0)
    assert len(order) == len(sizes) // processes * processes  # as many steps as the plain order
    assert len(set(order)) == len(order) and set(order) <= set(range(len(sizes)))
    steps = steps_of(order, processes)
    mixed = [step for step in steps if len({sizes[i] for i in step}) > 1]
    leftovers = sum(n % processes for n in counts.values())  # fewer than P left over from each size
    assert len(mixed) <= -(-leftovers // processes)
    for size, n in counts.items():  # every size's whole steps are there
        assert sum(sizes[i] == size for step in steps if step not in mixed for i in step) >= n // processes * processes
    # The mixed steps pair the nearest sizes: their ranges of pixel counts do not overlap.
    ranges = sorted((min(pixels), max(pixels)) for pixels in
                    ([0 if sizes[i] is None else sizes[i][0] * sizes[i][1] for i in step] for step in mixed))
    assert all(low[1] <= high[0] for low, high in zip(ranges, ranges[1:]))


def test_bucketed_order_is_a_function_of_seed_and_epoch():
    sizes = [(512, 512)] * 6 + [(768, 512)] * 5 + [(512, 768)] * 5
    first = bucketed_order(sizes, 4, seed=3, epoch=0)
    assert bucketed_order(sizes, 4, seed=3, epoch=0) == first  # a resumed run replays it
    assert bucketed_order(sizes, 4, seed=3, epoch=1) != first
    assert bucketed_order(sizes, 4, seed=4, epoch=0) != first
    seen = Counter(i for epoch in range(40) for i in bucketed_order(sizes, 4, seed=3, epoch=epoch))
    assert set(seen) == set(range(16))  # the dropped leftovers differ per epoch: no sample is left out for good
    one = bucketed_order(sizes, 1, seed=3, epoch=0)
    assert sorted(one) == list(range(16))  # one process: every item, once


def test_buckets_default_to_dynamic_resolution_with_several_processes():
    dynamic, fixed = DataConfig("d", "m"), DataConfig("d", "m", height=512, width=512)
    assert buckets_on(None, dynamic, 2) and not buckets_on(None, dynamic, 1) and not buckets_on(None, fixed, 8)
    assert buckets_on(True, fixed, 1) and not buckets_on(False, dynamic, 8)


def test_sizes_come_from_the_headers_as_the_loader_sizes_the_images(tmp_path):
    folder = tmp_path / "data"
    write_dataset(folder, sizes=((48, 32), (32, 32), (40, 56), (100, 60)),
                  extra_rows=[{"image": "missing.png", "prompt": "gone"}])
    dataset = ImageDataset(DataConfig(str(folder), str(folder / "metadata.csv"), max_pixels=40 * 40, repeat=2))
    sizes = row_sizes(dataset)
    assert sizes[4] is None
    for index in range(4):
        image = dataset[index]["image"]
        assert sizes[index] == (image.height, image.width)
    assert item_sizes(dataset) == sizes + sizes  # repeat


def test_a_trainer_with_buckets_follows_the_bucketed_order(base, tiny_repo, data, tmp_path):
    trainer = Trainer(make_config(tiny_repo, data, tmp_path / "out", buckets=True), components=fresh(base),
                      progress_bar=False)
    sizes = item_sizes(trainer.dataset)
    assert trainer._order(1) == bucketed_order(sizes, 1, 0, 1)
    plain = Trainer(make_config(tiny_repo, data, tmp_path / "out"), components=fresh(base), progress_bar=False)
    assert plain._order(1) == epoch_order(3, 0, 1)  # one process: buckets stay off by default


# -- validation images and logs ---------------------------------------------------------------------------------------
def test_validation_images_logs_and_speed(base, tiny_repo, tiny_pipe, data, tmp_path, capsys):
    """Images every step from the model as trained (the saved LoRA renders the same), the parameters in the PNG,
    the model back in train mode, the training itself unchanged; CSV and TensorBoard logs; s/step in the bar."""
    options = dict(max_steps=2, learning_rate=6e-2, lr_scheduler="constant", save_steps=1)
    plain = Trainer(make_config(tiny_repo, data, tmp_path / "plain", **options), components=fresh(base),
                    progress_bar=False)
    plain.run()
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # its part runs where it is installed
    config = make_config(tiny_repo, data, tmp_path / "out", validation_prompts=("a red cube", "a boat"),
                         validation_steps=1, validation_size=(32, 48), validation_num_inference_steps=2,
                         validation_cfg_scale=2.0, validation_seed=5, enable_csv_log=True,
                         enable_tensorboard_log=tensorboard, **options)
    trainer = Trainer(config, components=fresh(base), progress_bar=True)
    trainer.run()
    assert "s/step=" in capsys.readouterr().err
    assert [r.loss for r in trainer.history] == pytest.approx([r.loss for r in plain.history], rel=1e-6)
    assert trainer.dit.training and all(m.training for m in trainer.dit.modules())
    samples = tmp_path / "out" / "samples"
    assert sorted(str(p.relative_to(samples)) for p in samples.rglob("*.png")) == [
        "step-1/00.png", "step-1/01.png", "step-2/00.png", "step-2/01.png"]
    parameters = read_png_parameters(samples / "step-2" / "01.png")
    assert parameters["prompt"] == "a boat" and parameters["seed"] == 5 and parameters["cfg"] == 2.0
    assert parameters["training_step"] == 2 and parameters["size"] == "32x48" and parameters["steps"] == 2
    render = dict(cfg_scale=2.0, height=48, width=32, seed=5, num_inference_steps=2, progress_bar_cmd=lambda s: s)
    untrained = np.asarray(tiny_pipe("a boat", **render), dtype=np.int16)
    try:
        tiny_pipe.load_lora(tiny_pipe.dit, str(tmp_path / "out" / "step-2.safetensors"))
        expected = np.asarray(tiny_pipe("a boat", **render), dtype=np.int16)
    finally:
        tiny_pipe.clear_lora()
    rendered = np.asarray(Image.open(samples / "step-2" / "01.png"), dtype=np.int16)
    assert rendered.shape == (48, 32, 3) and np.abs(rendered - expected).max() <= 1
    assert np.abs(rendered - untrained).max() > 5  # the images show what was learned (33 levels measured)

    with open(tmp_path / "out" / CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert [float(r["loss"]) for r in rows] == [r.loss for r in trainer.history]
    assert [float(r["lr"]) for r in rows] == [r.lr for r in trainer.history] and float(rows[1]["time"]) > 1.7e9
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "out" / TENSORBOARD_DIR), size_guidance={"images": 0}).Reload()
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r.loss for r in trainer.history])
        assert [e.step for e in events.Scalars("train/steps_per_second")] == [1, 2]
        assert [e.step for e in events.Images("samples/01")] == [1, 2]


def test_validation_with_the_cache_brings_the_encoders_back_for_the_images(base, tiny_repo, data, tmp_path):
    config = make_config(tiny_repo, data, tmp_path / "out", max_steps=1, cache_dir=str(tmp_path / "cache"),
                         validation_prompts=("a cat",), validation_size=(32, 32), validation_num_inference_steps=1)
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    trainer.run()
    assert (tmp_path / "out" / "samples" / "step-1" / "00.png").is_file()
    assert trainer.components.text_encoder is not None  # kept (in host memory) for the images


def test_a_missing_tensorboard_is_reported_before_loading(tiny_repo, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an absent package looks like
    config = make_config(tiny_repo, data, tmp_path / "out", enable_tensorboard_log=True,
                         model_paths=(str(tmp_path / "nowhere.safetensors"),))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Trainer(config, progress_bar=False)


def test_a_resumed_csv_log_drops_the_steps_done_again(tiny_repo, data, tmp_path):
    config = make_config(tiny_repo, data, tmp_path, enable_csv_log=True)
    log = TrainingLog(config, 0)
    for step in (1, 2, 3):
        log.step(step, 0.5 * step, 1e-4, 0.1, None)
    log.close()
    log = TrainingLog(config, 1)  # resumed from the step-1 checkpoint
    log.step(2, 9.0, 1e-4, 0.1, None)
    log.close()
    rows = list(csv.DictReader(open(tmp_path / CSV_FILE, newline="")))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "0.5"), ("2", "9.0")]


def test_the_cli_takes_the_new_arguments(tiny_repo, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32), (48, 32)))
    (tmp_path / "prompts.txt").write_text("a cat\n\n a boat \n")
    out = tmp_path / "out"
    args = base_args(tiny_repo, data, out) + [
        "--lora_base_model", "dit", "--lora_rank", "4", "--max_steps", "1", "--cache", str(tmp_path / "cache"),
        "--buckets", "on", "--initialize_model_on_cpu", "--enable_csv_log", "--validation_prompts",
        str(tmp_path / "prompts.txt"), "--validation_size", "32x32", "--validation_num_inference_steps", "1"]
    assert main(args) == 0
    config = json.loads((out / "training_config.json").read_text())
    assert config["validation_prompts"] == ["a cat", "a boat"] and config["buckets"] is True
    assert config["cache_dir"] == str(tmp_path / "cache") and config["initialize_model_on_cpu"] is True
    assert sorted(p.name for p in (out / "samples" / "step-1").iterdir()) == ["00.png", "01.png"]
    assert (out / CSV_FILE).is_file() and (tmp_path / "cache" / "index.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--validation_steps", "5"], "renders nothing without validation_prompts"),
    (["--validation_prompts", "a", "--validation_size", "40x32"], "multiples of 16"),
    (["--validation_prompts", "missing.txt"], "no such file"),
])  # fmt: skip
def test_wrong_validation_arguments_stop_before_loading(tiny_repo, tmp_path, capsys, extra, message):
    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32),))
    with pytest.raises(SystemExit) as exit_info:
        main(base_args(tiny_repo, data, tmp_path / "out") + ["--lora_base_model", "dit"] + extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# -- accelerate / DeepSpeed -------------------------------------------------------------------------------------------
def deepspeed_plugin(config_file: Path):
    """accelerate's DeepSpeedPlugin as `accelerate launch --config_file` builds it from the yaml."""
    from accelerate.utils import DeepSpeedPlugin

    settings = dict(yaml.safe_load(config_file.read_text())["deepspeed_config"])
    if "deepspeed_config_file" in settings:
        settings["hf_ds_config"] = str(ROOT / settings.pop("deepspeed_config_file"))
    return DeepSpeedPlugin(**settings)


@pytest.mark.parametrize("name, stage, offload, processes", [
    ("full/accelerate_config_zero2offload.yaml", 2, "cpu", 8),
    ("full/accelerate_config.yaml", 2, "none", 8),
    ("full/accelerate_config_zero3.yaml", 3, "none", 8),
    ("special/low_vram_training/deepspeed_zero3_cpuoffload.yaml", 3, "cpu", 1),
])  # fmt: skip
def test_the_shipped_deepspeed_configs_carry_the_seeds_settings(name, stage, offload, processes):
    launch = yaml.safe_load((EXAMPLES / name).read_text())
    assert launch["distributed_type"] == "DEEPSPEED" and launch["num_processes"] == processes
    plugin = deepspeed_plugin(EXAMPLES / name)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == stage
    assert zero["offload_optimizer"]["device"] == offload and zero["offload_param"]["device"] == offload
    if name.startswith("full/"):
        assert launch["mixed_precision"] == "bf16" and plugin.zero3_init_flag == (stage == 3)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # what get_state_dict needs to save
    if "low_vram" in name:
        settings = json.loads((EXAMPLES / "special/low_vram_training/ds_z3_cpuoffload.json").read_text())
        zero = settings["zero_optimization"]
        assert settings["bf16"]["enabled"]
        assert zero["offload_optimizer"]["pin_memory"] and zero["offload_param"]["pin_memory"]
        assert zero["overlap_comm"] is False
        assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 5e7
        assert zero["stage3_param_persistence_threshold"] == 1e5 and zero["stage3_max_live_parameters"] == 1e8
        assert set(settings["activation_checkpointing"].values()) == {False}


class DeepSpeedAccelerator:
    """What the trainer's DeepSpeed hooks read of an accelerate Accelerator launched with a DeepSpeed config."""

    def __init__(self, plugin):
        from accelerate.state import GradientState

        self.state = type("State", (), {"deepspeed_plugin": plugin})()
        self.gradient_state = GradientState()


def test_the_trainer_sets_deepspeed_to_one_sample_and_its_own_steps():
    plugin = deepspeed_plugin(EXAMPLES / "full/accelerate_config_zero2offload.yaml")
    accelerator = DeepSpeedAccelerator(plugin)
    prepare_deepspeed(accelerator)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 1
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # no clipping, as without DeepSpeed
    set_boundary(accelerator, False)
    assert not accelerator.gradient_state.sync_gradients  # DeepSpeed will not step on this micro-batch
    set_boundary(accelerator, True)
    assert accelerator.gradient_state.sync_gradients
    plugin.deepspeed_config["gradient_accumulation_steps"] = 4
    with pytest.raises(ValueError, match="set it to 1 or auto and give --gradient_accumulation_steps"):
        prepare_deepspeed(accelerator)


def test_saving_from_partitioned_weights_writes_the_gathered_tensors(base, tiny_repo, data, tmp_path):
    """ZeRO-3 leaves each parameter an empty placeholder; the gathered tensors are written in their place."""
    trainer = Trainer(make_config(tiny_repo, data, tmp_path / "out", max_steps=1, learning_rate=2e-2),
                      components=fresh(base), progress_bar=False)
    trainer.run()
    trained = trainer.trained_module
    expected = {k: v.clone() for k, v in exported_state_dict(trained, trainer.config).items()}
    gathered = gathered_state(trainer.accelerator, trainer.model, trained)  # the non-ZeRO path: the module's own
    assert set(gathered) == set(trained.state_dict())
    gathered = {k: v.detach().clone() for k, v in gathered.items()}
    parameters = trainable_named_parameters(trained)
    for param in parameters.values():
        param.data = torch.empty(0)  # what a ZeRO-3 shard leaves in the module
    with holding(trained, gathered):
        path = save_weights(trained, trainer.config, "gathered.safetensors", 1)
    saved = load_file(path)
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert all(p.numel() == 0 for p in parameters.values())  # the placeholders are back


def test_a_partitioned_optimizer_is_saved_and_restored_per_process(tmp_path):
    """Under DeepSpeed ZeRO each process holds its own optimizer shard: each saves and gets back its own, and a
    resume with another number of processes is refused (two threads stand in for two processes)."""
    import threading

    from qistudio.training.checkpoint import CheckpointWriter, Progress, load_checkpoint

    barrier = threading.Barrier(2)
    shards = [{"state": {0: {"exp_avg": torch.full((3,), float(rank))}}, "param_groups": [{"lr": 0.1}]}
              for rank in range(2)]
    errors = []

    def save(rank):
        try:
            writer = CheckpointWriter(tmp_path, rank=rank, is_main=rank == 0, barrier=barrier.wait,
                                      partitioned_optimizer=True, world_size=2)
            writer.save(Progress(step=4), {"w": torch.ones(2)}, shards[rank], {"last_epoch": 4},
                        {"torch": torch.get_rng_state()}, {"seed": 0})
        except Exception as e:  # surfaced below; a thread's exception would be lost
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    path = tmp_path / "step-00000004"
    for rank in range(2):
        loaded = load_checkpoint(path, rank, world_size=2)
        assert torch.equal(loaded.optimizer_state["state"][0]["exp_avg"], torch.full((3,), float(rank)))
        assert loaded.scheduler_state == {"last_epoch": 4} and loaded.progress.step == 4
    with pytest.raises(ValueError, match="partitioned over 2 processes .* this run has 1; resume with 2"):
        load_checkpoint(path, 0, world_size=1)
