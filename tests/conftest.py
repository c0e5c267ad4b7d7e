import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tensor listings (names and shapes) of the released checkpoints: facts about those files, kept as test data so the
# tests never read outside the repository.
CHECKPOINTS = ROOT / "tests" / "data" / "checkpoints"

torch.set_num_threads(2)


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
