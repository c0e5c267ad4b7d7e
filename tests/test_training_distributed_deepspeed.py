"""DeepSpeed ZeRO-3 through `accelerate launch` with the seed's shipped config, on 2 CPU processes (DeepSpeed's CPU
accelerator, gloo): each process allocates and reads only its partition of the DiT's blocks (no process holds the
whole DiT), the full fine-tune equals one process accumulating 2 micro-batches, and its checkpoint (each
process's optimizer partition in qistudio's pickle-free files) resumes exactly. DeepSpeed builds its shared-memory
communication op with the C++ compiler the first time (a minute or so, cached in ~/.cache/torch_extensions)."""

import re

import pytest
from safetensors.torch import load_file

from qistudio.cli.main import main
from test_training_distributed import EXAMPLES, assert_same_weights, cli_args, cpu_config, launch
from test_training_data import write_dataset

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_zero3_full_finetune_equals_one_process_and_resumes_exactly(tiny_repo, tmp_path):
    import yaml

    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32),) * 4)
    config = cpu_config(EXAMPLES / "accelerate_config_zero3.yaml", tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["mixed_precision"] = "no"  # float32, to compare with the plain run (the shipped config says bf16)
    config.write_text(yaml.safe_dump(settings))
    common = ["--trainable_models", "dit", "--learning_rate", "1e-4", "--max_steps", "4", "--save_steps", "2"]
    zero3 = common + ["--keep_checkpoints", "2"]
    status, output = launch(cli_args(tiny_repo, data, tmp_path / "zero3", *zero3), accelerate_config=config)
    assert status == 0, output[-3000:]
    assert "on 2 process(es)" in output
    assert_partitioned_on_load(output)
    state = tmp_path / "zero3" / "checkpoints" / "step-00000002"
    assert {p.name for p in state.glob("optimizer-rank*")} == {"optimizer-rank0.safetensors",
                                                               "optimizer-rank1.safetensors"}  # partitioned
    assert main(cli_args(tiny_repo, data, tmp_path / "one", *common, "--gradient_accumulation_steps", "2")) == 0
    reference = load_file(tmp_path / "one" / "step-4.safetensors")
    assert_same_weights(load_file(tmp_path / "zero3" / "step-4.safetensors"), reference, atol=2e-6)

    # The seed's --initialize_model_on_cpu is accepted and changes nothing: the DiT is still loaded partitioned.
    status, output = launch(cli_args(tiny_repo, data, tmp_path / "resumed", *zero3, "--initialize_model_on_cpu",
                                     "--resume", str(state)), accelerate_config=config)
    assert status == 0, output[-3000:]
    assert_same_weights(load_file(tmp_path / "resumed" / "step-4.safetensors"), reference, atol=2e-6)
    assert_partitioned_on_load(output)


def assert_partitioned_on_load(output: str) -> None:
    """Each process allocated about half of the DiT blocks' elements (its partitions, padded to even sizes) and
    read little more from the files (whole rows around its range); none allocated or read them all."""
    reports = re.findall(r"ZeRO-3: process (\d) allocated (\d+) and read (\d+) of the DiT blocks' (\d+)", output)
    assert sorted(int(r[0]) for r in reports) == [0, 1], output[-3000:]
    for _, allocated, read, total in reports:
        allocated, read, total = int(allocated), int(read), int(total)
        print(f"allocated {allocated}, read {read} of {total}")
        assert total / 2 <= allocated <= total / 2 + 200  # 1 element of padding per odd-sized tensor at most
        assert allocated - 200 <= read <= 0.6 * total
