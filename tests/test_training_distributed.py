"""`qistudio train` under torchrun with 2 gloo processes on the CPU, through the real command line: it completes
(once it hung), and N processes train what one process accumulating N micro-batches trains (DDP: full and LoRA
with streamed blocks), a killed process stops the run with a message and --resume continues."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from qistudio.cli.main import main
from test_training import model_paths
from test_training_data import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

LAUNCH_TIMEOUT_S = 150  # a hang fails the test instead of the suite


def cli_args(repo, data, output, *extra) -> list[str]:
    """`train` arguments for the tiny repository and a fixed-size dataset, with no device named: the run finds
    the CPU (gloo) by itself, as a user's would."""
    paths = [list(p) if isinstance(p, tuple) else p for p in model_paths(repo)]
    return ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_paths", json.dumps(paths), "--tokenizer_path", str(repo / "tokenizer"), "--output_path",
            str(output), "--height", "32", "--width", "32", "--seed", "7", *extra]


def launch(args: list[str], processes: int = 2, timeout: float = LAUNCH_TIMEOUT_S, on_start=None):
    """`torchrun --standalone --nproc_per_node N -m qistudio.cli.main ARGS`; returns (exit status, output). The
    whole process group is killed if it outlives `timeout` (the test then fails as a hang)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "qistudio.cli.main", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        if on_start is not None:
            on_start(process)
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{processes} processes did not finish within {timeout} s (hang); output:\n{output[-3000:]}")
    return process.returncode, output


@pytest.fixture
def data(tmp_path):
    write_dataset(tmp_path / "data", sizes=((32, 32),) * 4)
    return tmp_path / "data"


def assert_same_weights(ours: dict, reference: dict, atol: float) -> None:
    assert ours.keys() == reference.keys()
    worst = max(float((ours[k].double() - reference[k].double()).abs().max()) for k in ours)
    print(f"largest difference {worst:.2e}")
    assert worst <= atol, worst


def test_two_processes_full_finetune_completes_and_equals_one_process_accumulating(tiny_repo, data, tmp_path):
    """The issue's hang: `torchrun --nproc_per_node 2 qistudio train` of a tiny full fine-tune on the CPU. It runs
    to the end (gloo found without --device; the last block's unused text output frozen, so DDP needs no
    find_unused_parameters), and its DiT equals one process with --gradient_accumulation_steps 2 after 3 steps."""
    common = ["--trainable_models", "dit", "--max_steps", "3", "--learning_rate", "1e-4"]
    status, output = launch(cli_args(tiny_repo, data, tmp_path / "two", *common))
    assert status == 0, output[-3000:]
    assert "on 2 process(es)" in output and "trained 3 steps" in output
    assert main(cli_args(tiny_repo, data, tmp_path / "one", *common, "--gradient_accumulation_steps", "2")) == 0
    two, one = (load_file(tmp_path / run / "step-3.safetensors") for run in ("two", "one"))
    assert_same_weights(two, one, atol=2e-6)
    start = load_file(tiny_repo / "transformer" / "diffusion_pytorch_model-00001-of-00005.safetensors")
    assert any(not torch.equal(two[k], start[k]) for k in start)  # it trained
