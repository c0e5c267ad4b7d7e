"""bench/train_scale.py: the shrunken full-width model its one-GPU run prepares, the refusal of a 4-GPU run without
DiffSynth-Studio's trainer (before anything is written), and its one-GPU run on the CPU with the tiny demo model
(--smoke: the plain step and FSDP2 with one process through accelerate launch and the shipped config)."""

import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import train_scale  # noqa: E402


def test_shrunken_model_keeps_the_full_width():
    full = train_scale.listed_tensors("qwen_image_transformer")
    shrunk = train_scale.listed_tensors("qwen_image_transformer", {"transformer_blocks.": 8})
    assert all(shrunk[name] == full[name] for name in shrunk)
    assert {name for name in full if not name.startswith("transformer_blocks.")} < set(shrunk)
    assert {int(name.split(".")[1]) for name in shrunk if name.startswith("transformer_blocks.")} == set(range(8))
    per_block = sum(math.prod(shape) for name, shape in full.items() if name.startswith("transformer_blocks.0."))
    assert per_block > 300e6  # a block of the 20B model, not of a narrower one
    text = train_scale.listed_tensors("qwen_image_text_encoder", {"model.layers.": 2, "visual.blocks.": 1})
    config = train_scale.text_encoder_config(text)
    assert config.text_config.num_hidden_layers == 2 and config.vision_config.depth == 1
    assert config.text_config.hidden_size == 3584  # what the DiT's txt_in takes


def test_our_peak_is_the_last_one_our_progress_bar_showed():
    bar = "training:  50%| 1/2 [loss=0.71, peak=12.5GiB]\rtraining: 100%| 2/2 [loss=0.70, peak=13.0GiB]"
    assert train_scale.torch_peak(bar) == 13.0 * 2**30
    assert train_scale.torch_peak("training: 100%| 2/2 [loss=0.70, s/step=0.1]") is None  # the CPU shows none


def test_a_run_with_diffsynth_needs_its_trainer_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_scale.main(["all", str(tmp_path / "scale")])
    assert "--diffsynth-train" in capsys.readouterr().err and not (tmp_path / "scale").exists()


@pytest.mark.usefixtures("one_thread")
def test_single_gpu_run_smoke_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "train_scale.py"), "single", "--smoke", "--work",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    table = (tmp_path / "train_scale.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| case")}
    assert rows.keys() == {"plain", "fsdp2"}
    assert all(float(seconds) > 0 for seconds in rows.values()), table  # both trained (FSDP2 engaged: sharded)
