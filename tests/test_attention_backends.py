"""Attention behind one function: the automatic choice, forcing a backend, and agreement between backends."""

import pytest
import torch
import torch.nn.functional as F

from qistudio.ops.attention import attention, available_backends, set_attention_backend

# Relative L2 of each optional backend's output against PyTorch's SDPA (random q, k, v; bench/RESULTS.md).
TOLERANCE = {"sdpa": 0.0, "cudnn_fp8": 0.08, "sage": 0.03, "flash3": 0.01, "flash4": 0.01}


@pytest.fixture(autouse=True)
def _automatic_after():
    yield
    set_attention_backend(None)


def _qkv(device, dtype=torch.float32, batch=2, seq=33, heads=3, dim=16):
    return [torch.randn(batch, seq, heads, dim, device=device, dtype=dtype) for _ in range(3)]


def test_padding_is_sliced():
    q, k, v = _qkv("cpu")
    expected = F.scaled_dot_product_attention(q[:1].transpose(1, 2), k[:1, :20].transpose(1, 2),
                                              v[:1, :20].transpose(1, 2)).transpose(1, 2)
    out = attention(q, k, v, key_lengths=[20, 33])
    assert torch.allclose(out[:1], expected, atol=1e-6)
    assert "sdpa" in available_backends()


def test_forcing_an_unknown_or_missing_backend_names_the_choices():
    with pytest.raises(ValueError, match="choose one of sdpa, cudnn_fp8, sage, flash3, flash4"):
        set_attention_backend("xformers")
    missing = [name for name in ("cudnn_fp8", "sage", "flash3", "flash4") if name not in available_backends()]
    for name in missing:
        with pytest.raises(ValueError, match="cannot run here"):
            set_attention_backend(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU backends")
@pytest.mark.parametrize("name", ["sdpa", "cudnn_fp8", "sage", "flash3", "flash4"])
def test_backends_agree_on_gpu(name):
    if name not in available_backends():
        pytest.skip(f"{name} is not installed here")
    q, k, v = _qkv("cuda", torch.bfloat16, seq=1024, heads=4, dim=128)
    set_attention_backend("sdpa")
    reference = attention(q, k, v, key_lengths=[1000, 1024]).float()
    set_attention_backend(name)
    out = attention(q, k, v, key_lengths=[1000, 1024]).float()
    assert ((out - reference).norm() / reference.norm()).item() <= TOLERANCE[name] + 1e-3


@pytest.fixture
def _fresh_automatic_choice(monkeypatch):
    from qistudio.ops import attention as attention_module

    monkeypatch.setattr(attention_module, "_automatic_backend", None)
    yield attention_module
    attention_module._automatic_backend = None


def test_automatic_choice_is_flash4_where_it_runs_else_sdpa(_fresh_automatic_choice, monkeypatch):
    from qistudio.ops import flash4

    monkeypatch.setattr(flash4, "flash4_available", lambda index=0: False)
    assert _fresh_automatic_choice.resolve_automatic_backend() == "sdpa"
    _fresh_automatic_choice._automatic_backend = None
    monkeypatch.setattr(flash4, "flash4_available", lambda index=0: True)
    assert _fresh_automatic_choice.resolve_automatic_backend() == "flash4"
    # Chosen once: a later change of what is installed does not switch kernels under compiled graphs.
    monkeypatch.setattr(flash4, "flash4_available", lambda index=0: False)
    assert _fresh_automatic_choice.resolve_automatic_backend() == "flash4"


def test_flash4_keeps_what_its_kernel_cannot_take_on_sdpa(monkeypatch):
    """Head dims over 256 (the VAE's 384-wide head), float32 and inputs needing gradients go to SDPA; the kernel
    is an opaque custom op whose fake implementation gives the output shape (so compiled graphs keep it whole)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qistudio.ops import attention as attention_module

    from qistudio.ops import flash4

    called, kernel = [], []
    monkeypatch.setattr(attention_module, "_sdpa", lambda q, k, v, mask=None: called.append(q.shape[-1]) or q)
    monkeypatch.setattr(flash4, "flash4_attention", lambda q, k, v: kernel.append(q.shape[-1]) or q)
    q384 = torch.randn(1, 8, 1, 384, dtype=torch.bfloat16)
    attention_module._flash4(q384, q384, q384)
    q36 = torch.randn(1, 8, 1, 36, dtype=torch.bfloat16)
    attention_module._flash4(q36, q36, q36)
    q32 = torch.randn(1, 8, 2, 64)
    attention_module._flash4(q32, q32, q32)
    grad = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    attention_module._flash4(grad, grad, grad)
    assert called == [384, 36, 64, 64] and kernel == []
    q128 = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    attention_module._flash4(q128, q128, q128)
    with torch.no_grad():
        attention_module._flash4(grad, grad, grad)
    assert kernel == [128, 64]
    with FakeTensorMode():
        q, k = torch.empty(2, 100, 24, 128, dtype=torch.bfloat16), torch.empty(2, 80, 24, 128, dtype=torch.bfloat16)
        out = torch.ops.qistudio.flash4_attention(q, k, k)
    assert out.shape == (2, 100, 24, 128) and out.dtype == torch.bfloat16


def test_a_padded_batch_is_one_flash4_launch_with_per_sample_key_lengths(monkeypatch):
    """Under flash4, a batch whose samples have different valid key counts (guidance with a prompt and a negative
    prompt of other lengths) is one kernel call given the counts (its `seqused_k`), not one call per sample plus a
    join; the op keeps its output shape when traced."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qistudio.ops import attention as attention_module
    from qistudio.ops import flash4

    calls = []

    def fake_kernel(q, k, v, key_lengths=None):  # the kernel's contract, computed per sample by SDPA
        calls.append(key_lengths)
        return torch.cat([F.scaled_dot_product_attention(q[i:i + 1].transpose(1, 2), k[i:i + 1, :n].transpose(1, 2),
                                                         v[i:i + 1, :n].transpose(1, 2)).transpose(1, 2)
                          for i, n in enumerate(key_lengths)])

    monkeypatch.setattr(flash4, "flash4_attention", fake_kernel)
    monkeypatch.setattr(attention_module, "_kernel", lambda query: attention_module._flash4)
    q, k, v = _qkv("cpu", torch.bfloat16)
    with torch.no_grad():
        out = attention(q, k, v, key_lengths=[20, 33])
    assert calls == [[20, 33]]
    monkeypatch.setattr(attention_module, "_kernel", lambda query: attention_module._sdpa)
    assert torch.equal(out, attention(q, k, v, key_lengths=[20, 33]))
    with FakeTensorMode():
        q, k = torch.empty(2, 100, 24, 128, dtype=torch.bfloat16), torch.empty(2, 80, 24, 128, dtype=torch.bfloat16)
        out = torch.ops.qistudio.flash4_attention(q, k, k, [60, 80])
    assert out.shape == (2, 100, 24, 128)


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
