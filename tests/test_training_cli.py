"""`qistudio train` end to end on the tiny model, its refusals, and the example scripts run as written."""

import json
import os
import runpy
import re
import shlex
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from qistudio.cli.main import main
from test_training import model_paths
from test_training_data import write_dataset

EXAMPLES = ROOT / "examples" / "model_training"


pytestmark = pytest.mark.usefixtures("one_thread")


def base_args(repo, data, output) -> list[str]:
    paths = [list(p) if isinstance(p, tuple) else p for p in model_paths(repo)]
    return ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_paths", json.dumps(paths), "--tokenizer_path", str(repo / "tokenizer"), "--device", "cpu",
            "--output_path", str(output)]


def test_train_a_lora_then_resume(tiny_repo, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data)
    args = base_args(tiny_repo, data, tmp_path / "out") + [
        "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-3", "--save_steps", "1",
        "--max_steps", "2", "--height", "32", "--width", "32", "--seed", "3"]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"step-1.safetensors", "step-2.safetensors", "training_config.json",
                                               "checkpoints"}
    assert all(k.startswith("transformer.") for k in load_file(out / "step-2.safetensors"))
    config = json.loads((out / "training_config.json").read_text())
    assert config["seed"] == 3 and config["data"]["height"] == 32 and config["lora_format"] == "diffusers"
    assert main(args[:-8] + ["--max_steps", "3", "--height", "32", "--width", "32", "--seed", "3", "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert (out / "step-3.safetensors").is_file() and (out / "checkpoints" / "latest").read_text() == "step-00000003\n"


@pytest.mark.parametrize("extra, message", [
    (["--fp8_models", "dit"], "--fp8_models is not supported yet"),
    (["--enable_wandb_log"], "--enable_wandb_log is not supported yet"),
    (["--resume_from_checkpoint", "x"], "use --resume"),
    (["--extra_inputs", "controlnet_image", "--data_file_keys", "image,controlnet_image"],
     r"extra_inputs \['controlnet_image'\] are not supported yet"),
    (["--task", "direct_distill"], "--task direct_distill is not supported yet"),
    (["--trainable_models", "dit"], "one of the two"),
    (["--height", "32"], "give both height and width"),
    (["--model_paths", "[\"/nowhere.safetensors\"]"], "no such file or folder /nowhere.safetensors"),
    (["--demo"], "--demo brings its own model and dataset; leave out --model_paths, --tokenizer_path, "
                 "--dataset_base_path, --dataset_metadata_path"),
])  # fmt: skip
def test_unsupported_and_wrong_arguments_stop_before_loading(tiny_repo, tmp_path, capsys, extra, message):
    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32),))
    with pytest.raises(SystemExit) as exit_info:
        main(base_args(tiny_repo, data, tmp_path / "out") + ["--lora_base_model", "dit"] + extra)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def script_arguments(path) -> list[str]:
    """The `qistudio train` arguments of an example script (after `... qistudio.cli.main train`)."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    words = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    assert words[:4] == ["accelerate", "launch", "--module", "qistudio.cli.main"] and words[4] == "train", words[:5]
    return words[4:]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_example_scripts_run_as_written(tiny_repo, tmp_path, monkeypatch, kind):
    """The seed's scripts, ported: the hub files are the tiny repository on disk; one step on the CPU."""
    models = tmp_path / "models" / "Qwen"
    models.mkdir(parents=True)
    (models / "Qwen-Image").symlink_to(tiny_repo, target_is_directory=True)
    write_dataset(tmp_path / "data" / "example_image_dataset", sizes=((48, 32), (32, 48)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QISTUDIO_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("QISTUDIO_SKIP_DOWNLOAD", "1")
    args = script_arguments(EXAMPLES / kind / "Qwen-Image.sh")
    workers = ["--dataset_num_workers", "2"] if "--dataset_num_workers" in args else []
    assert main(args + ["--max_steps", "1", "--device", "cpu", *workers]) == 0
    output = tmp_path / "models" / "train" / f"Qwen-Image_{kind}"
    saved = load_file(output / "step-1.safetensors")
    if kind == "lora":
        assert len(saved) == 2 * 12 * 2 and all(k.startswith("transformer.") for k in saved)
    else:
        assert "transformer_blocks.0.attn.to_q.weight" in saved
    assert sorted(os.listdir(output / "checkpoints")) == ["latest", "step-00000001"]
    # The matching validation script renders an image with the result (the seed's validate_{lora,full}).
    monkeypatch.setenv("QISTUDIO_EXAMPLE_DEVICE", "cpu")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_STEPS", "1")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_SIZE", "32")
    monkeypatch.setenv("QISTUDIO_EXAMPLE_CHECKPOINT", str(output / "step-1.safetensors"))
    namespace = runpy.run_path(str(EXAMPLES / f"validate_{kind}" / "Qwen-Image.py"), run_name="__main__")
    assert (tmp_path / "image.jpg").exists()
    assert len(namespace["pipe"].list_loras()) == (1 if kind == "lora" else 0)
    # `qistudio validate` tells a LoRA from a full checkpoint by itself and renders each prompt.
    assert main(["validate", str(output / "step-1.safetensors"), "--model", str(tiny_repo), "--steps", "1",
                 "--size", "32x32", "--prompt", "a cat", "--prompt", "a boat", "-o", str(tmp_path / "val")]) == 0
    from qistudio.imageio import read_png_parameters

    pngs = sorted((tmp_path / "val").glob("*.png"))
    assert len(pngs) == 2 and read_png_parameters(pngs[1])["checkpoint_kind"] == kind


def test_a_sigkilled_run_resumes_to_the_weights_of_a_straight_run(tiny_repo, tmp_path):
    """A real `kill -9` while `qistudio train` runs (a checkpoint per step, so most likely mid-step or mid-save),
    then `--resume`: the final LoRA equals a straight run's."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    write_dataset(data)
    steps = 20
    common = ["--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-3", "--save_steps", "1",
              "--max_steps", str(steps), "--dataset_repeat", "8", "--height", "32", "--width", "32", "--seed", "5"]
    assert main(base_args(tiny_repo, data, tmp_path / "straight") + common) == 0

    killed = tmp_path / "killed"
    args = base_args(tiny_repo, data, killed) + common
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); "
                                "from qistudio.cli.main import main; sys.exit(main(sys.argv[1:]))", *args],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "latest").exists():  # the first checkpoint is complete
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / f"step-{steps}.safetensors").exists(), "the run finished before the kill"
    assert main(args + ["--resume"]) == 0
    straight, resumed = (load_file(tmp_path / run / f"step-{steps}.safetensors") for run in ("straight", "killed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)


def test_the_dataset_is_required_unless_demo(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lora_base_model", "dit", "--output_path", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--dataset_base_path is required (or --demo" in capsys.readouterr().err


def test_max_steps_past_the_epochs_runs_further_epochs(tiny_repo, tmp_path, capsys):
    """3 samples, --num_epochs 1, --max_steps 5: max_steps wins (as in diffusers' scripts), epoch 2 stops at its
    second sample; the help says so."""
    data = tmp_path / "data"
    write_dataset(data)
    out = tmp_path / "out"
    args = base_args(tiny_repo, data, out) + ["--lora_base_model", "dit", "--lora_rank", "4", "--height", "32",
                                              "--width", "32", "--num_epochs", "1", "--max_steps", "5"]
    assert main(args) == 0
    assert "trained 5 steps" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["epoch-0.safetensors", "step-5.safetensors"]
    state = json.loads((out / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert (state["progress"]["epoch"], state["progress"]["position"]) == (1, 2)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "wins over --num_epochs" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def demo_home(tiny_repo, tmp_path, monkeypatch):
    """An XDG cache whose demo model is the session's tiny repository (the demo's sizes, already built: building
    the demo itself is test_cli's), so the test times training, not the build."""
    from qistudio.demo import DEMO_VERSION, MARKER

    folder = tmp_path / "cache" / "qistudio" / "demo"
    folder.mkdir(parents=True)
    for name in ("transformer", "text_encoder", "vae", "tokenizer", "processor", "scheduler"):
        (folder / name).symlink_to(tiny_repo / name, target_is_directory=True)
    (folder / MARKER).write_text(json.dumps({"version": DEMO_VERSION, "seed": 0}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return folder


def test_train_demo_trains_a_lora_in_seconds_that_generate_demo_uses(demo_home, tmp_path, monkeypatch, capsys):
    from qistudio.training.data import read_metadata

    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert main(["train", "--demo"]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "trained 8 steps" in printed and seconds < 30, seconds
    out = tmp_path / "models" / "train" / "demo_lora"
    assert {p.name for p in out.iterdir()} == {"epoch-0.safetensors", "training_config.json", "checkpoints",
                                               "demo_dataset"}
    lora = load_file(out / "epoch-0.safetensors")
    assert len(lora) == 2 * 12 * 2 and all(k.startswith("transformer.") for k in lora)
    assert all(torch.isfinite(t).all() for t in lora.values()) and any(t.abs().sum() > 0 for t in lora.values())
    rows = read_metadata(out / "demo_dataset" / "metadata.csv")
    assert len(rows) == 8 and rows[0] == {"image": "00_red_circle.png", "prompt": "a red circle on a white background"}
    assert all((out / "demo_dataset" / row["image"]).is_file() for row in rows)
    # The line it ends with runs as printed (here with fewer, smaller steps).
    hint = printed.strip().splitlines()[-1]
    assert hint.startswith("try the LoRA: qistudio generate --demo --lora models/train/demo_lora/epoch-0.safetensors")
    assert main(shlex.split(hint.split("qistudio ", 1)[1]) + ["--steps", "1", "--size", "64x64"]) == 0
    assert (tmp_path / "demo_lora.png").is_file()
    # Again with --resume: the dataset is reused and the run finds nothing left to do.
    assert main(["train", "--demo", "--resume"]) == 0
    assert "nothing left to train: the run had done its 8 steps" in capsys.readouterr().out
