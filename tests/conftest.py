import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
CHECKPOINTS = SHARED / "reference" / "checkpoints"

torch.set_num_threads(2)


def checkpoint_listing(name: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    return {k: tuple(v) for k, v in data["tensors"].items()}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
