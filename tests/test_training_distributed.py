"""`qistudio train` under torchrun with 2 gloo processes on the CPU, through the real command line: it completes
(once it hung); N processes train what one process accumulating N micro-batches trains (DDP, FSDP2, FSDP2 of
Qwen-Image 2.1 with a prefix that differs between the processes); FSDP2's sharded checkpoints resume under another
number of processes (2 -> 1, 1 -> 2); a killed process stops the run with a message and --resume continues; the
consolidated weights load in diffusers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from qistudio.cli.main import main
from test_training import model_paths
from test_training_data import write_dataset
from test_training_qwen21 import model_paths as model_paths21
from test_training_qwen21 import write_dataset as write_dataset21
from tiny_qwen21 import tiny_repository21

pytestmark = pytest.mark.usefixtures("one_thread")

LAUNCH_TIMEOUT_S = 150  # a hang fails the test instead of the suite
EXAMPLES = ROOT / "examples" / "model_training" / "full"


def cli_args(repo, data, output, *extra) -> list[str]:
    """`train` arguments for the tiny repository and a fixed-size dataset, with no device named: the run finds
    the CPU (gloo) by itself, as a user's would."""
    paths = [list(p) if isinstance(p, tuple) else p for p in model_paths(repo)]
    return ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_paths", json.dumps(paths), "--tokenizer_path", str(repo / "tokenizer"), "--output_path",
            str(output), "--height", "32", "--width", "32", "--seed", "7", *extra]


def launch(args: list[str], processes: int = 2, timeout: float = LAUNCH_TIMEOUT_S, on_start=None,
           accelerate_config: Path | None = None):
    """`torchrun --standalone --nproc_per_node N -m qistudio.cli.main ARGS` (or `accelerate launch --config_file
    CONFIG --module qistudio.cli.main ARGS`); returns (exit status, output). The whole process group is killed if
    it outlives `timeout` (the test then fails as a hang)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "qistudio.cli.main", *args]
    if accelerate_config is not None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                   "--module", "qistudio.cli.main", *args]
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


# -- FSDP2 ------------------------------------------------------------------------------------------------------------
FSDP_STEPS = 12  # 8 samples, an optimizer step takes 2: three epochs


@pytest.fixture(scope="module")
def fsdp_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp") / "data"
    write_dataset(folder, sizes=((32, 32),) * 4)
    return folder


def fsdp_args(repo, data, output, *extra) -> list[str]:
    return cli_args(repo, data, output, "--trainable_models", "dit", "--learning_rate", "1e-4", "--dataset_repeat",
                    "2", "--max_steps", str(FSDP_STEPS), "--save_steps", "6", "--use_gradient_checkpointing", *extra)


@pytest.fixture(scope="module")
def one_process_reference(tiny_repo, fsdp_data, tmp_path_factory):
    """The DiT after 12 steps of one process accumulating 2 micro-batches, no FSDP."""
    out = tmp_path_factory.mktemp("reference")
    assert main(fsdp_args(tiny_repo, fsdp_data, out, "--gradient_accumulation_steps", "2")) == 0
    return load_file(out / f"step-{FSDP_STEPS}.safetensors")


@pytest.fixture
def in_process_group():
    """A one-process FSDP run in this process forms a process group of one (the CLI ends it; a failure might
    not)."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cpu_config(config: Path, folder: Path) -> Path:
    """A shipped accelerate config for 2 processes on the CPU, on a free port."""
    import socket

    import yaml

    settings = yaml.safe_load(config.read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.update(num_processes=2, use_cpu=True, main_process_port=port)
    path = folder / config.name
    path.write_text(yaml.safe_dump(settings))
    return path


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started."""
    import psutil

    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            environment = child.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in environment and "qistudio.cli.main" in " ".join(child.cmdline()):
            found[int(environment["RANK"])] = child.pid
    return found


def kill_rank_1_after_the_first_checkpoint(output: Path):
    """A `launch` on_start: SIGKILLs rank 1 as soon as a checkpoint of the run writing to `output` is complete
    (`checkpoints/latest` names it); fails if the run ends first or none comes within LAUNCH_TIMEOUT_S."""

    def kill(launcher: subprocess.Popen) -> None:
        deadline = time.time() + LAUNCH_TIMEOUT_S
        while not (output / "checkpoints" / "latest").exists():
            assert launcher.poll() is None, "the run ended before a checkpoint"
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(worker_pids(launcher)[1], signal.SIGKILL)

    return kill


def test_fsdp_killed_process_stops_all_then_resumes_under_one_process_then_two(
        tiny_repo, fsdp_data, one_process_reference, tmp_path, in_process_group, capsys):
    """FSDP2 on 2 processes, one SIGKILLed after the first checkpoint: the run ends (no hang) with a message
    naming the last complete checkpoint. That sharded checkpoint resumes under ONE process (2 -> 1), whose
    checkpoint at step 6 resumes under TWO (1 -> 2); the DiT after 12 steps equals one process accumulating 2
    micro-batches without FSDP. The consolidated file is the released layout: diffusers loads it strictly."""
    killed = tmp_path / "killed"

    status, output = launch(fsdp_args(tiny_repo, fsdp_data, killed, "--fsdp", "--save_steps", "1"),
                            on_start=kill_rank_1_after_the_first_checkpoint(killed))
    assert status != 0 and not (killed / f"step-{FSDP_STEPS}.safetensors").exists(), output[-3000:]
    assert "--resume continues from it" in output, output[-3000:]
    latest = killed / "checkpoints" / (killed / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "state.json").read_text())["world_size"] == 2

    one = tmp_path / "one"  # 2 -> 1, keeping every checkpoint
    # The same samples per optimizer step, or no resume: 2 processes x 1 = 1 process x 2.
    assert main(fsdp_args(tiny_repo, fsdp_data, one, "--fsdp", "--resume", str(latest))) == 1
    assert "with 1 process(es) use --gradient_accumulation_steps 2" in capsys.readouterr().err
    assert main(fsdp_args(tiny_repo, fsdp_data, one, "--fsdp", "--keep_checkpoints", "2", "--resume", str(latest),
                          "--gradient_accumulation_steps", "2")) == 0
    assert_same_weights(load_file(one / f"step-{FSDP_STEPS}.safetensors"), one_process_reference, atol=2e-6)

    two = tmp_path / "two"  # 1 -> 2, through accelerate launch and the shipped FSDP2 config (on 2 CPU processes)
    middle = one / "checkpoints" / "step-00000006"
    assert json.loads((middle / "state.json").read_text())["world_size"] == 1
    status, output = launch(fsdp_args(tiny_repo, fsdp_data, two, "--resume", str(middle)),
                            accelerate_config=cpu_config(EXAMPLES / "accelerate_config_fsdp2.yaml", tmp_path))
    assert status == 0, output[-3000:]
    assert (two / "checkpoints" / f"step-{FSDP_STEPS:08d}" / "sharded").is_dir()  # the config turned FSDP2 on
    final = load_file(two / f"step-{FSDP_STEPS}.safetensors")
    assert_same_weights(final, one_process_reference, atol=2e-6)

    from diffusers import QwenImageTransformer2DModel

    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text((tiny_repo / "transformer" / "config.json").read_text())
    (released / "diffusion_pytorch_model.safetensors").symlink_to(two / f"step-{FSDP_STEPS}.safetensors")
    model = QwenImageTransformer2DModel.from_pretrained(released, low_cpu_mem_usage=False)
    state = model.state_dict()
    assert state.keys() == final.keys() and all(torch.equal(state[k], final[k]) for k in final)


def test_fsdp_of_21_where_one_process_edits_and_the_other_does_not_equals_one_process(tmp_path_factory, tmp_path):
    """Qwen-Image 2.1 under FSDP2 on 2 processes (once refused): the dataset's two rows, one with two edit images and
    one text-to-image, give each process one row a step, always different, so the processes' prefixes differ in
    shape at every step (what made their per-block gradient reduce-scatters come in different orders when each block
    ran twice a step); block 0 checkpointed, block 1 not. It completes, and its DiT equals one process accumulating
    the 2 rows without FSDP."""
    repo, data = tiny_repository21(tmp_path_factory), write_dataset21(tmp_path / "data")

    def args(output, *extra):
        paths = [list(p) if isinstance(p, tuple) else p for p in model_paths21(repo)]
        return ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.json"),
                "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image", "--model_paths",
                json.dumps(paths), "--processor_path", str(repo / "processor"), "--trainable_models", "dit",
                "--learning_rate", "1e-4", "--max_steps", "3", "--save_steps", "3", "--use_gradient_checkpointing",
                "--checkpointed_blocks", "1", "--seed", "7", "--output_path", str(output), *extra]

    status, output = launch(args(tmp_path / "two", "--fsdp"))
    assert status == 0, output[-3000:]
    assert "on 2 process(es)" in output and "trained 3 steps" in output
    assert (tmp_path / "two" / "checkpoints" / "step-00000003" / "sharded").is_dir()  # FSDP2 sharded the DiT
    assert main(args(tmp_path / "one", "--gradient_accumulation_steps", "2")) == 0
    two, one = (load_file(tmp_path / run / "step-3.safetensors") for run in ("two", "one"))
    assert_same_weights(two, one, atol=2e-6)
    start = load_file(sorted((repo / "transformer").glob("*.safetensors"))[0])
    assert start.keys() <= two.keys() and any(not torch.equal(two[k], start[k]) for k in start)  # it trained


# -- LoRA under DDP ---------------------------------------------------------------------------------------------------
def test_lora_under_ddp_in_low_memory_mode_with_size_buckets_equals_one_process(tiny_repo, tmp_path):
    """The low-memory mode under DDP (once refused with several processes): a LoRA on 2 processes, each holding the
    frozen DiT base in FP8 (--fp8_base) and streaming its blocks through its device (--vram_limit 0), on images of
    three sizes (buckets: both processes train one size at a time), equals one process on the same FP8 base
    accumulating 2 micro-batches with the same buckets and no streaming."""
    data = tmp_path / "data"
    write_dataset(data, sizes=((32, 32), (48, 32), (32, 48), (48, 32), (32, 32), (32, 48)))
    common = ["--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-3", "--max_steps", "4",
              "--buckets", "on", "--save_steps", "4", "--fp8_base"]
    dynamic = [a for a in cli_args(tiny_repo, data, tmp_path / "two") if a not in ("--height", "--width", "32")]
    status, output = launch(dynamic + common + ["--vram_limit", "0", "--use_gradient_checkpointing"])
    assert status == 0, output[-3000:]
    assert "on 2 process(es)" in output
    assert output.count("low-memory training: FP8 base") == 2 and output.count("2 of 2 blocks streamed") == 2  # each
    one = [a if a != str(tmp_path / "two") else str(tmp_path / "one") for a in dynamic]
    assert main(one + common + ["--gradient_accumulation_steps", "2"]) == 0
    two, one = (load_file(tmp_path / run / "step-4.safetensors") for run in ("two", "one"))
    assert_same_weights(two, one, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for k, t in two.items() if "lora_B" in k)  # it trained


def test_fsdp_in_bfloat16_reduces_in_float32_and_equals_the_plain_bfloat16_run(tiny_repo, data, tmp_path,
                                                                                in_process_group):
    """The GPU setting on one CPU process: bf16 parameters under MixedPrecisionPolicy(reduce_dtype=float32), per
    block checkpointing, no launcher (a process group of one); the bf16 DiT it saves equals the plain run's."""
    common = ["--trainable_models", "dit", "--max_steps", "2", "--learning_rate", "1e-4", "--dtype", "bfloat16",
              "--use_gradient_checkpointing"]
    assert main(cli_args(tiny_repo, data, tmp_path / "fsdp", *common, "--fsdp")) == 0
    assert main(cli_args(tiny_repo, data, tmp_path / "plain", *common)) == 0
    sharded, plain = (load_file(tmp_path / run / "step-2.safetensors") for run in ("fsdp", "plain"))
    assert {t.dtype for t in sharded.values()} == {torch.bfloat16} and sharded.keys() == plain.keys()
    # Equal but for rounding: nearly every element identical; where a gradient's last bf16 bit differs, AdamW
    # (which moves each weight by about the learning rate per step, whatever the gradient's size) can move a
    # weight near zero the other way: at most 2 x lr x steps apart.
    assert_same_weights(sharded, plain, atol=2 * 1e-4 * 2)
    same = sum(int((sharded[k] == plain[k]).sum()) for k in plain) / sum(t.numel() for t in plain.values())
    # 99.98% measured; 99.75% when FSDP cast the blocks' float inputs (the float32 RoPE table) to bf16.
    assert same > 0.999, same


def test_a_failed_launched_process_ignores_the_launchers_sigterm_until_it_exits(monkeypatch):
    """When a peer dies, the survivor raises ProcessGroupError naming the checkpoint, and torchrun then SIGTERMs
    every process: from the error on, SIGTERM is ignored, so its default action cannot kill the survivor before
    that message is printed (it once did, in a whole-suite run). A run that ends well gets its handler back."""
    from qistudio.training import distributed
    from qistudio.training.errors import ProcessGroupError, RunStopped

    monkeypatch.setenv("WORLD_SIZE", "2")
    original = signal.getsignal(signal.SIGTERM)
    try:
        with distributed.failures_explained(0, 60, lambda: "note"):
            assert signal.getsignal(signal.SIGTERM) not in (original, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is original
        with pytest.raises(ProcessGroupError, match="another process of this run died.*note"):
            with distributed.failures_explained(0, 60, lambda: "note"):
                raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, original)
        with pytest.raises(RunStopped, match="SIGTERM.*note"):
            with distributed.failures_explained(0, 60, lambda: "note"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises in this thread well before
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, original)
        with pytest.raises(ValueError):  # not a peer's failure: the handler comes back, the error goes through
            with distributed.failures_explained(0, 60, lambda: "note"):
                raise ValueError("a bug")
        assert signal.getsignal(signal.SIGTERM) is original
    finally:
        signal.signal(signal.SIGTERM, original)
