"""DeepSpeed ZeRO-3 through `accelerate launch` with the seed's shipped config, on 2 CPU processes (DeepSpeed's CPU
accelerator, gloo): each process allocates and reads only its partition of the DiT's blocks (no process holds the
whole DiT); a SIGKILLed process stops the run with a message; its checkpoint (each process's slice of every
parameter's optimizer state, in qistudio's pickle-free files) resumes under another number of processes: 2 -> 1,
then that run's checkpoint 1 -> 2 in the CPU-offload form, each equal to one process accumulating 2 micro-batches
without DeepSpeed. DeepSpeed builds its shared-memory communication op with the C++ compiler the first time (a
minute or so, cached in ~/.cache/torch_extensions)."""

import json
import os
import re
import signal
import time

import pytest
from safetensors.torch import load_file

from qistudio.cli.main import main
from test_training_distributed import (EXAMPLES, LAUNCH_TIMEOUT_S, assert_same_weights, cli_args, cpu_config, launch,
                                       worker_pids)
from test_training_data import write_dataset

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")


def zero3_config(folder, processes: int, offload: bool = False):
    """The shipped ZeRO-3 config on the CPU, float32 (to compare with the plain run; the shipped one says bf16);
    with `offload`, its CPU-offload form (parameters and optimizer state in host memory)."""
    import yaml

    config = cpu_config(EXAMPLES / "accelerate_config_zero3.yaml", folder)
    settings = yaml.safe_load(config.read_text())
    settings.update(mixed_precision="no", num_processes=processes)
    if offload:
        settings["deepspeed_config"].update(offload_optimizer_device="cpu", offload_param_device="cpu")
    config = config.with_name(f"zero3-{processes}{'-offload' if offload else ''}.yaml")
    config.write_text(yaml.safe_dump(settings))
    return config


def test_zero3_loads_partitioned_stops_on_a_killed_process_and_resumes_under_other_process_counts(tiny_repo, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32),) * 4)
    base = ["--trainable_models", "dit", "--learning_rate", "1e-4"]
    common = base + ["--max_steps", "4", "--keep_checkpoints", "2"]
    killed = tmp_path / "killed"

    def kill_rank_1_after_the_first_checkpoint(launcher):
        deadline = time.time() + LAUNCH_TIMEOUT_S
        while not (killed / "checkpoints" / "latest").exists():
            assert launcher.poll() is None, "the run ended before a checkpoint"
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(worker_pids(launcher)[1], signal.SIGKILL)

    # 2 processes, one SIGKILLed after the first checkpoint (the run is set for far more steps than it gets to, and
    # keeps every checkpoint): the other stops with a message naming the last complete checkpoint, no hang.
    status, output = launch(cli_args(tiny_repo, data, killed, *base, "--max_steps", "400", "--save_steps", "2",
                                     "--keep_checkpoints", "1000"), accelerate_config=zero3_config(tmp_path, 2),
                            on_start=kill_rank_1_after_the_first_checkpoint)
    assert status != 0 and "--resume continues from it" in output, output[-3000:]
    assert "on 2 process(es)" in output
    assert_partitioned_on_load(output, processes=2)
    state = killed / "checkpoints" / "step-00000002"
    assert {p.name for p in state.glob("optimizer-rank*")} == {"optimizer-rank0.safetensors",
                                                               "optimizer-rank1.safetensors"}  # partitioned
    assert main(cli_args(tiny_repo, data, tmp_path / "one", *common, "--save_steps", "2",
                         "--gradient_accumulation_steps", "2")) == 0
    reference = load_file(tmp_path / "one" / "step-4.safetensors")

    # 2 -> 1 (accumulating 2: the same samples per step). The seed's --initialize_model_on_cpu is accepted and
    # changes nothing: the DiT is still loaded partitioned.
    status, output = launch(cli_args(tiny_repo, data, tmp_path / "single", *common, "--save_steps", "1",
                                     "--gradient_accumulation_steps", "2", "--initialize_model_on_cpu", "--resume",
                                     str(state)), accelerate_config=zero3_config(tmp_path, 1))
    assert status == 0, output[-3000:]
    assert "resumed from" in output and "on 1 process(es)" in output
    assert_partitioned_on_load(output, processes=1)
    assert_same_weights(load_file(tmp_path / "single" / "step-4.safetensors"), reference, atol=2e-6)

    # 1 -> 2, from that run's checkpoint at step 3, in ZeRO-3's CPU-offload form
    middle = tmp_path / "single" / "checkpoints" / "step-00000003"
    assert json.loads((middle / "state.json").read_text())["world_size"] == 1
    status, output = launch(cli_args(tiny_repo, data, tmp_path / "double", *common, "--save_steps", "1", "--resume",
                                     str(middle)), accelerate_config=zero3_config(tmp_path, 2, offload=True))
    assert status == 0, output[-3000:]
    assert_same_weights(load_file(tmp_path / "double" / "step-4.safetensors"), reference, atol=2e-6)


def assert_partitioned_on_load(output: str, processes: int) -> None:
    """Each process allocated its share of the DiT blocks' elements (its partitions, padded to a multiple of the
    processes) and read little more from the files (whole rows around its range); with 2, none read them all."""
    reports = re.findall(r"ZeRO-3: process (\d) allocated (\d+) and read (\d+) of the DiT blocks' (\d+)", output)
    assert sorted(int(r[0]) for r in reports) == list(range(processes)), output[-3000:]
    for _, allocated, read, total in reports:
        allocated, read, total = int(allocated), int(read), int(total)
        print(f"allocated {allocated}, read {read} of {total}")
        assert total / processes <= allocated <= total / processes + 200  # padding: < 1 element per tensor
        assert allocated - 200 <= read <= (0.6 if processes == 2 else 1) * total


def test_the_partitioning_reads_a_deepspeed_config_without_its_auto_settings():
    """accelerate fills "auto" settings in at prepare, after the DiT is partitioned: DeepSpeed's parser is shown
    the config without them (at any depth), the rest as it was."""
    from qistudio.training.zero_load import _without_auto

    config = {"train_batch_size": "auto", "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "offload_param": {"device": "cpu"}}}
    assert _without_auto(config) == {"bf16": {"enabled": True},
                                     "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert config["zero_optimization"]["reduce_bucket_size"] == "auto"  # a copy
