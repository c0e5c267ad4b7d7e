"""Attention behind one function: the automatic choice, forcing a backend, and agreement between backends."""

import pytest
import torch
import torch.nn.functional as F

from qistudio.ops.attention import attention, available_backends, set_attention_backend

# Relative L2 of each optional backend's output against PyTorch's SDPA (random q, k, v; bench/RESULTS.md).
TOLERANCE = {"sdpa": 0.0, "cudnn_fp8": 0.08, "sage": 0.03, "flash3": 0.01}


@pytest.fixture(autouse=True)
def _automatic_after():
    yield
    set_attention_backend(None)


def _qkv(device, dtype=torch.float32, batch=2, seq=33, heads=3, dim=16):
    return [torch.randn(batch, seq, heads, dim, device=device, dtype=dtype) for _ in range(3)]


def test_automatic_choice_is_sdpa_and_padding_is_sliced():
    q, k, v = _qkv("cpu")
    expected = F.scaled_dot_product_attention(q[:1].transpose(1, 2), k[:1, :20].transpose(1, 2),
                                              v[:1, :20].transpose(1, 2)).transpose(1, 2)
    out = attention(q, k, v, key_lengths=[20, 33])
    assert torch.allclose(out[:1], expected, atol=1e-6)
    assert "sdpa" in available_backends()


def test_forcing_an_unknown_or_missing_backend_names_the_choices():
    with pytest.raises(ValueError, match="choose one of sdpa, cudnn_fp8, sage, flash3"):
        set_attention_backend("xformers")
    missing = [name for name in ("cudnn_fp8", "sage", "flash3") if name not in available_backends()]
    for name in missing:
        with pytest.raises(ValueError, match="cannot run here"):
            set_attention_backend(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU backends")
@pytest.mark.parametrize("name", ["sdpa", "cudnn_fp8", "sage", "flash3"])
def test_backends_agree_on_gpu(name):
    if name not in available_backends():
        pytest.skip(f"{name} is not installed here")
    q, k, v = _qkv("cuda", torch.bfloat16, seq=1024, heads=4, dim=128)
    reference = attention(q, k, v, key_lengths=[1000, 1024]).float()
    set_attention_backend(name)
    out = attention(q, k, v, key_lengths=[1000, 1024]).float()
    assert ((out - reference).norm() / reference.norm()).item() <= TOLERANCE[name] + 1e-3


def test_fp8_attention_flag_is_per_module_and_cpu_stays_exact(tiny_pipe, inputs):
    """FP8 compute asks the DiT's attention modules for FP8 attention; where the kernel cannot run (here, the CPU)
    they compute exactly as before."""
    from qistudio.ops.attention import set_fp8_attention

    dit = tiny_pipe.dit
    with torch.no_grad():
        before = inputs.ours(dit)
        try:
            assert set_fp8_attention(dit, True) == dit.config.num_layers
            assert all(block.attn.fp8_attention for block in dit.transformer_blocks)
            after = inputs.ours(dit)
        finally:
            set_fp8_attention(dit, False)
    assert torch.equal(before, after)
