"""Bad checkpoints: each fails with one clear error naming the file and the tensors, before any weight is read."""

import pytest
import torch
from safetensors.torch import save_file

from qistudio import ModelConfig
from qistudio.weights.build import load_model
from qistudio.weights.errors import CheckpointError
from qistudio.weights.hub import resolve_files
from tiny_models import reference_dit


@pytest.fixture(scope="module")
def dit_state():
    return {k: v.contiguous() for k, v in reference_dit(num_layers=1).state_dict().items()}


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        resolve_files(ModelConfig(path=str(tmp_path / "nowhere.safetensors")))
    with pytest.raises(CheckpointError, match="file not found"):
        load_model([tmp_path / "nowhere.safetensors"])


def test_truncated_file(tmp_path, dit_state):
    path = tmp_path / "dit.safetensors"
    save_file(dit_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"dit\.safetensors: truncated: tensor '.+' ends at byte"):
        load_model([path])


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 4, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"])
def test_corrupt_file(tmp_path, garbage):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_model([path])


def test_tensors_of_no_known_model(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(CheckpointError, match=r"match no known model.*conv1\.weight"):
        load_model([path])


def test_shape_mismatch_and_missing_tensors_listed(tmp_path, dit_state):
    bad = dict(dit_state)
    bad["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(64, 32)
    del bad["transformer_blocks.0.attn.to_k.bias"]
    bad["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "dit.safetensors"
    save_file(bad, path)
    with pytest.raises(CheckpointError) as info:
        load_model([path])
    message = str(info.value)
    assert "dit.safetensors" in message
    assert "1 missing:\n    transformer_blocks.0.attn.to_k.bias" in message
    assert "1 unexpected:\n    transformer_blocks.0.attn.extra.weight" in message
    assert "1 wrong shape:\n    transformer_blocks.0.attn.to_q.weight: file [64, 32]" in message


def test_nothing_is_unpickled(tmp_path, dit_state):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model([path])
    # A plain torch state dict loads through the weights-only path.
    torch.save(dit_state, tmp_path / "dit.bin")
    kind, model = load_model([tmp_path / "dit.bin"], dtype=torch.float32)
    assert kind == "dit" and torch.equal(model.img_in.weight, dit_state["img_in.weight"])


def test_errors_come_before_any_weight_is_placed(tmp_path, dit_state, monkeypatch):
    """The whole checkpoint is checked before the first tensor is read."""
    from qistudio.weights import safetensors_io

    bad = dict(dit_state)
    bad["proj_out.weight"] = torch.zeros(1, 1)
    save_file(bad, tmp_path / "dit.safetensors")
    reads = []
    monkeypatch.setattr(safetensors_io.TensorSource, "get", lambda self, name: reads.append(name))
    with pytest.raises(CheckpointError):
        load_model([tmp_path / "dit.safetensors"])
    assert reads == []
