"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` with the seed's shipped configs, on 2 CPU processes
(DeepSpeed's CPU accelerator, gloo): a SIGKILLed process stops the run with a message; the checkpoints (each
process's slice of every parameter's optimizer state, in qistudio's pickle-free files) resume under another number
of processes and across the stages, one run's checkpoint feeding the next: the killed run's ZeRO-2 (the shipped
CPU-offload form) on 2 -> ZeRO-3 on 1, ZeRO-3 1 -> 2 (in its CPU-offload form), ZeRO-3 -> ZeRO-2 2 -> 1, each run
equal to one process accumulating 2 micro-batches without DeepSpeed; under ZeRO-3 each process allocates
and reads only its partition of the DiT's blocks (no process holds the whole DiT). DeepSpeed builds its shared-memory
communication op and its CPU Adam with the C++ compiler the first time (a minute or so, cached in
~/.cache/torch_extensions)."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qistudio.cli.main import main
from test_training_distributed import (EXAMPLES, assert_same_weights, cli_args, cpu_config,
                                       kill_rank_1_after_the_first_checkpoint, launch)
from test_training_data import write_dataset

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = {2: "accelerate_config_zero2offload.yaml", 3: "accelerate_config_zero3.yaml"}
STEPS = 4  # each resumed run starts one step later than the one before it


def zero_config(folder, stage: int, processes: int, offload: bool = False):
    """The shipped ZeRO-`stage` config on the CPU, float32 (to compare with the plain run; the shipped ones say
    bf16); with `offload` its CPU-offload form (optimizer state, and under ZeRO-3 parameters, in host memory)."""
    import yaml

    config = cpu_config(EXAMPLES / SHIPPED[stage], folder)
    settings = yaml.safe_load(config.read_text())
    settings.update(mixed_precision="no", num_processes=processes)
    device = "cpu" if offload else "none"
    settings["deepspeed_config"].update(offload_optimizer_device=device, offload_param_device=device)
    config = config.with_name(f"zero{stage}-{processes}{'-offload' if offload else ''}.yaml")
    config.write_text(yaml.safe_dump(settings))
    return config


def test_zero_checkpoints_resume_under_other_process_counts_and_stages(tiny_repo, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32),) * 4)
    base = ["--trainable_models", "dit", "--learning_rate", "1e-4", "--save_steps", "1", "--keep_checkpoints", "1000"]
    common = base + ["--max_steps", str(STEPS)]
    killed = tmp_path / "killed"

    # ZeRO-2 (the shipped offload form), 2 processes, one SIGKILLed after the first checkpoint (the run is set for
    # far more steps than it gets to): the other stops with a message naming the last complete checkpoint, no hang.
    status, output = launch(cli_args(tiny_repo, data, killed, *base, "--max_steps", "400"),
                            accelerate_config=zero_config(tmp_path, 2, 2, offload=True),
                            on_start=kill_rank_1_after_the_first_checkpoint(killed))
    # The survivor names its checkpoint: torchrun's SIGTERM, which may come after its error is raised, is ignored
    # from then on (training/distributed.py; a whole-suite run once saw the survivor end by SIGTERM, silently).
    assert status != 0 and "--resume continues from it" in output, output[-3000:]
    assert "on 2 process(es)" in output
    first = killed / "checkpoints" / "step-00000001"
    assert_split_by_parameter(first, processes=2, partitioned_weights=True)
    assert main(cli_args(tiny_repo, data, tmp_path / "one", *common, "--gradient_accumulation_steps", "2")) == 0
    reference = load_file(tmp_path / "one" / f"step-{STEPS}.safetensors")

    # Without DeepSpeed the ZeRO checkpoint is refused before any model loads, naming what would read it.
    capsys.readouterr()
    assert main(cli_args(tiny_repo, data, tmp_path / "plain", *common, "--resume", str(first))) == 1
    assert "resume it under DeepSpeed ZeRO-1, 2 or 3" in capsys.readouterr().err

    def resume(name, source, stage, processes, *extra, offload=False):
        """A run resumed from `source` under ZeRO-`stage` with `processes`; its DiT equals the reference's."""
        accumulate = ["--gradient_accumulation_steps", "2"] if processes == 1 else []
        args = cli_args(tiny_repo, data, tmp_path / name, *common, *accumulate, *extra, "--resume", str(source))
        status, output = launch(args, accelerate_config=zero_config(tmp_path, stage, processes, offload))
        assert status == 0, output[-3000:]
        assert "resumed from" in output and f"on {processes} process(es)" in output
        assert_same_weights(load_file(tmp_path / name / f"step-{STEPS}.safetensors"), reference, atol=2e-6)
        return output

    def saved(name, step):
        return tmp_path / name / "checkpoints" / f"step-{step:08d}"

    # ZeRO-2 -> ZeRO-3, 2 -> 1. The seed's --initialize_model_on_cpu is accepted and changes nothing: the DiT is still
    # loaded partitioned.
    output = resume("zero3-single", first, 3, 1, "--initialize_model_on_cpu")
    assert_partitioned_on_load(output, processes=1)
    assert json.loads((saved("zero3-single", 2) / "state.json").read_text())["world_size"] == 1
    output = resume("zero3-double", saved("zero3-single", 2), 3, 2, offload=True)  # ZeRO-3: 1 -> 2, offloaded
    assert_partitioned_on_load(output, processes=2)
    assert_split_by_parameter(saved("zero3-double", 3), processes=2, partitioned_weights=False)
    resume("back-to-zero2", saved("zero3-double", 3), 2, 1)  # ZeRO-3 -> ZeRO-2, 2 -> 1


def assert_split_by_parameter(checkpoint, processes: int, partitioned_weights: bool) -> None:
    """Each process's file holds slices of the trained parameters' float32 master weights which, put together,
    are every parameter's weights (a float32 run: the weights are the master weights), each element once. Under
    ZeRO-2 (`partitioned_weights`) a process holds pieces of some parameters only; under ZeRO-3 of every one."""
    from qistudio.training.checkpoint import read_tree

    state = json.loads((checkpoint / "state.json").read_text())
    assert state["partitioned_optimizer"] == "by_parameter" and state["world_size"] == processes
    weights = load_file(checkpoint / "weights.safetensors")
    files = [read_tree(checkpoint / f"optimizer-rank{rank}.safetensors", lambda name: False)
             for rank in range(processes)]
    assert {p.name for p in checkpoint.glob("optimizer-rank*")} == {f"optimizer-rank{r}.safetensors"
                                                                    for r in range(processes)}
    for name, weight in weights.items():
        pieces = sorted(((f["parameters"][name]["start"], f["parameters"][name]["fp32"]) for f in files
                         if name in f["parameters"]), key=lambda piece: piece[0])
        assert pieces[0][0] == 0 and all(a[0] + a[1].numel() == b[0] for a, b in zip(pieces, pieces[1:]))
        assert torch.equal(torch.cat([piece for _, piece in pieces]), weight.flatten()), name
        kinds = [set(f["parameters"][name]) for f in files if name in f["parameters"]]
        assert all(kind == {"start", "fp32", "exp_avg", "exp_avg_sq"} for kind in kinds), kinds  # AdamW's moments
    held = [len(f["parameters"]) for f in files]
    assert (max(held) < len(weights)) if partitioned_weights else (held == [len(weights)] * processes), held


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


def test_an_optimizer_state_is_refused_where_no_engine_reads_it(tmp_path):
    """Before any model loads: ZeRO's state by parameter resumes under ZeRO-1, 2 or 3 only (the launch above shows
    a run without DeepSpeed refusing it), the whole state of a run without DeepSpeed only without DeepSpeed;
    DeepSpeed's own shards are left to their process-count check (checkpoint.read_state)."""
    from accelerate.utils import DeepSpeedPlugin

    from qistudio.training.zero import check_resumable

    def accelerator(plugin):  # what check_resumable reads of accelerate's Accelerator
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))

    zero1, zero2, zero3 = (accelerator(DeepSpeedPlugin(zero_stage=stage)) for stage in (1, 2, 3))
    stage0, plain = accelerator(DeepSpeedPlugin(zero_stage=0)), accelerator(None)
    by_parameter, whole, shards = ({"partitioned_optimizer": value} for value in ("by_parameter", False, True))
    for run in (zero1, zero2, zero3):
        check_resumable(run, by_parameter, tmp_path)
    check_resumable(plain, whole, tmp_path)
    check_resumable(zero2, shards, tmp_path)
    for run in (plain, stage0):
        with pytest.raises(ValueError, match="saved under DeepSpeed ZeRO .*; resume it under DeepSpeed ZeRO-1, 2 or 3"):
            check_resumable(run, by_parameter, tmp_path)
    for run in (stage0, zero2, zero3):
        with pytest.raises(ValueError, match=f"{tmp_path}: it was saved without DeepSpeed .* without DeepSpeed"):
            check_resumable(run, whole, tmp_path)


def test_the_partitioning_reads_a_deepspeed_config_without_its_auto_settings():
    """accelerate fills "auto" settings in at prepare, after the DiT is partitioned: DeepSpeed's parser is shown
    the config without them (at any depth), the rest as it was."""
    from qistudio.training.zero_load import _without_auto

    config = {"train_batch_size": "auto", "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "offload_param": {"device": "cpu"}}}
    assert _without_auto(config) == {"bf16": {"enabled": True},
                                     "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert config["zero_optimization"]["reduce_bucket_size"] == "auto"  # a copy
