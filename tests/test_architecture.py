"""Guards of the layout: imports point down the list (ops <- models <- weights <- pipeline), models are pure."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qistudio"

# For each layer, the package modules it must never import.
FORBIDDEN = {
    "ops": ("qistudio.models", "qistudio.weights", "qistudio.sampling", "qistudio.conditioning", "qistudio.pipeline",
            "qistudio.components", "qistudio.cli"),
    "models": ("qistudio.weights", "qistudio.sampling", "qistudio.conditioning", "qistudio.pipeline",
               "qistudio.components", "qistudio.cli"),
    "sampling": ("qistudio.models", "qistudio.weights", "qistudio.conditioning", "qistudio.pipeline",
                 "qistudio.components", "qistudio.cli"),
    "lora": ("qistudio.sampling", "qistudio.conditioning", "qistudio.pipeline", "qistudio.components",
             "qistudio.cli"),
    "weights": ("qistudio.sampling", "qistudio.conditioning", "qistudio.pipeline", "qistudio.components",
                "qistudio.cli"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down(layer):
    for path in (PACKAGE / layer).glob("*.py"):
        bad = [n for n in _imports(path) if n.startswith(FORBIDDEN[layer])]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_models_do_no_io_or_device_policy():
    for path in (PACKAGE / "models").glob("*.py"):
        text = path.read_text()
        for word in ("open(", ".cuda(", "os.environ", "safetensors", "huggingface_hub", "modelscope"):
            assert word not in text, f"{path.name} contains {word!r}"


def test_hub_code_needs_no_torch():
    assert not any(n.startswith("torch") for n in _imports(PACKAGE / "weights" / "hub.py"))
