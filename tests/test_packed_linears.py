"""The text stream's q/k/v as one GEMM (models/packed_linears.py): same output, same memory, and off wherever
something else owns or wraps the weights."""

import pytest
import torch

from conftest import rel_err
from qistudio.models.dit import DiTConfig, QwenImageDiT
from qistudio.models.packed_linears import release_packed, set_packed_text_qkv
from qistudio.ops.rope import ImageGrid, qwen_rotary

CFG = DiTConfig(num_layers=2, num_heads=2, head_dim=16, text_dim=24, axes_dim=(4, 6, 6))


@pytest.fixture
def dit():
    torch.manual_seed(0)
    model = QwenImageDiT(CFG).eval().requires_grad_(False)
    for p in model.parameters():  # non-zero biases and gates: every path shows in the output
        p.data.normal_(0, 0.2)
    return model


def _run(model):
    torch.manual_seed(1)
    tokens, text = torch.randn(2, 12, CFG.in_channels), torch.randn(2, 5, CFG.text_dim)
    rotary = qwen_rotary([ImageGrid(0, 3, 4)], 5, axes_dim=CFG.axes_dim)
    with torch.no_grad():
        return model(tokens, text, torch.tensor([0.3, 0.7]), rotary, text_lengths=[5, 3])


def _packed(attn) -> bool:
    q, k, v = attn.add_q_proj.weight, attn.add_k_proj.weight, attn.add_v_proj.weight
    step = q.numel() * q.element_size()
    return k.data_ptr() == q.data_ptr() + step and v.data_ptr() == q.data_ptr() + 2 * step


@pytest.fixture
def unpacked_output(dit):
    set_packed_text_qkv(False)
    try:
        return _run(dit)
    finally:
        set_packed_text_qkv(True)


def test_packed_forward_equals_three_linears_and_keeps_memory(dit, unpacked_output):
    before = sum(p.numel() for p in dit.parameters())
    out = _run(dit)
    assert all(_packed(block.attn) for block in dit.transformer_blocks)
    assert rel_err(out, unpacked_output) < 1e-6
    # The linears' weights are views of the packed tensor: no second copy, names and shapes unchanged.
    attn = dit.transformer_blocks[0].attn
    weight, bias = attn.packed_text_qkv()
    assert attn.add_v_proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert weight.shape == (3 * CFG.dim, CFG.dim) and bias.shape == (3 * CFG.dim,)
    assert sum(p.numel() for p in dit.parameters()) == before
    assert dit.state_dict()["transformer_blocks.0.attn.add_k_proj.weight"].shape == (CFG.dim, CFG.dim)


def test_in_place_weight_change_reaches_the_packed_form(dit):
    _run(dit)
    with torch.no_grad():  # as fuse_lora does: param.copy_(fused)
        for block in dit.transformer_blocks:
            block.attn.add_k_proj.weight.add_(0.1)
    out = _run(dit)
    set_packed_text_qkv(False)
    try:
        assert rel_err(out, _run(dit)) < 1e-6
    finally:
        set_packed_text_qkv(True)


def test_not_packed_when_trained_hooked_or_not_owned(dit, unpacked_output):
    attn = dit.transformer_blocks[0].attn
    attn.add_q_proj.weight.requires_grad_(True)  # a trained weight keeps its own storage
    assert attn.packed_text_qkv() is None
    attn.add_q_proj.weight.requires_grad_(False)

    calls = []
    handle = attn.add_k_proj.register_forward_hook(lambda *args: calls.append(1))  # a runtime LoRA's hook
    assert torch.equal(_run(dit)[0], _run(dit)[0]) and calls and not _packed(attn)
    handle.remove()

    # Views into a storage someone else manages (the offloaders' flat buffers) are left alone.
    flat = torch.zeros(3 * CFG.dim * CFG.dim + 64)
    for i, layer in enumerate(attn.text_projections):
        layer.weight.data = flat[64 + i * CFG.dim**2: 64 + (i + 1) * CFG.dim**2].view(CFG.dim, CFG.dim).copy_(
            layer.weight)
    assert attn.packed_text_qkv() is None
    assert rel_err(_run(dit), unpacked_output) < 1e-6


def test_a_move_drops_the_packed_copy_and_repacks(dit, unpacked_output):
    _run(dit)
    attn = dit.transformer_blocks[0].attn
    old = attn.packed_text_qkv()[0]
    dit.to(torch.float64)
    assert getattr(attn, "_packed_linears") is None  # the float32 packed weight is not held any more
    out = _run(dit.to(torch.float32))
    assert _packed(attn) and attn.packed_text_qkv()[0].data_ptr() != old.data_ptr()
    assert rel_err(out, unpacked_output) < 1e-6
    release_packed(dit)
    assert all(getattr(b.attn, "_packed_linears") is None for b in dit.transformer_blocks)


def test_switching_off_and_on_repacks_without_a_copy(dit, unpacked_output):
    _run(dit)
    attn = dit.transformer_blocks[1].attn
    first = attn.packed_text_qkv()[0].data_ptr()
    set_packed_text_qkv(False)
    try:
        assert rel_err(_run(dit), unpacked_output) < 1e-6 and getattr(attn, "_packed_linears") is None
    finally:
        set_packed_text_qkv(True)
    assert attn.packed_text_qkv()[0].data_ptr() == first  # the same storage, adopted again
    assert rel_err(_run(dit), unpacked_output) < 1e-6
