import json
import os
import sys
from pathlib import Path

import pytest

# pytest-xdist (`-n auto`, for machines of more than two cores: on two, the suite's own subprocesses already fill
# them and one process is faster): the workers share the machine's cores, so each computes on one thread, and so do
# the processes the tests start (CLI runs, torchrun ranks, servers): a CLI image compared pixel for pixel with the
# in-process pipeline must come from GEMMs of the same thread count. Set before torch is imported.
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tensor listings (names and shapes) of the released checkpoints: facts about those files, kept as test data so the
# tests never read outside the repository.
CHECKPOINTS = ROOT / "tests" / "data" / "checkpoints"

torch.set_num_threads(1 if XDIST_WORKER else 2)

# The files that take longest, first, under pytest-xdist: with `--dist loadfile` it hands out whole files in
# collection order, so a long file started last would leave one worker running alone at the end.
SLOW_FILES = ("test_training_distributed_deepspeed.py", "test_training_distributed.py", "test_ui_browser.py",
              "test_parallel.py", "test_cli.py", "test_examples.py", "test_server.py", "test_compile.py",
              "test_server_ray.py", "test_bench_train_scale.py", "test_qwen21_runtime.py", "test_step_cache.py",
              "test_qwen21_fast.py", "test_step_cache_parity.py", "test_qwen21_pipeline.py", "test_engine.py")


def pytest_collection_modifyitems(config, items):
    if not XDIST_WORKER:
        return  # one process: the files in their usual order
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest keep their order


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 and one per 6 GB of memory (a worker with its models and the
    processes some tests start peaks at a few GB); none (one process) for the GPU tests, which share one card and
    hold full-size models, and for a single file, which one worker would run alone anyway."""
    targets = [str(arg).split("::")[0] for arg in config.args]
    if "gpu" in (config.option.markexpr or "") or any(Path(t).parts[-2:-1] == ("gpu",) or Path(t).name == "gpu"
                                                       for t in targets):
        return 0
    if len(targets) == 1 and targets[0].endswith(".py"):
        return 0
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        memory_gb = 12.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4, int(memory_gb // 6)))


def checkpoint_listing(name: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    return {k: tuple(v) for k, v in data["tensors"].items()}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """A tiny random Qwen-Image repository in the real on-disk layout (built once per test session)."""
    from tiny_models import write_tiny_qwen_image

    return write_tiny_qwen_image(tmp_path_factory.mktemp("Qwen-Image"))


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """qistudio's demo model (tiny random weights, the real Qwen2.5 tokenizer), written once per test session by
    write_demo_model (~3.6 s of CPU a write); tests only read it."""
    from qistudio.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_repo):
    """Our pipeline loaded from the tiny repository in float32 on the CPU, as the seed's quick start loads it."""
    from qistudio import ModelConfig, QwenImagePipeline

    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[
            ModelConfig(path=sorted(str(p) for p in (tiny_repo / "transformer").glob("*.safetensors"))),
            ModelConfig(path=str(tiny_repo / "text_encoder")),
            ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")),
        ],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )


@pytest.fixture(scope="module")
def reference():
    """diffusers' tiny QwenImageTransformer2DModel with random weights (the DiT the LoRA and FP8 tests modify)."""
    from tiny_models import reference_dit

    return reference_dit()


@pytest.fixture(scope="module")
def inputs():
    """One fixed tiny DiT call (lora_files.Inputs)."""
    from lora_files import Inputs

    return Inputs()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices (training tests): one thread is fastest, and immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
