"""FP8 weight storage: e4m3 rounding within its bound, the DiT within a measured tolerance, exact against the plain
path on the dequantised weights, state dicts, `.to()` that never casts the stored bytes, and LoRAs beside it.

Measured on these tiny models (CPU, torch 2.14): one layer's weight and output relative L2 error about 2.6%;
the tiny DiT's output 0.53% (float32) and 0.75% (bfloat16, against the bfloat16 plain path), with its block linears
in FP8; the tiny text encoder's 3.6%. The bounds asserted below are about twice those.
"""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import rel_err
from lora_files import TARGETS, Inputs, merged, our_dit, peft_layout, random_pairs
from qistudio.lora import LoRAError, fuse_lora, list_loras, load_lora, lora_tensors, set_lora_scale, unload_lora
from qistudio.memory.fp8_linear import (FP8_DTYPE, FP8Linear, dit_fp8_predicate, quantize_linears, quantize_weight,
                                        text_encoder_fp8_predicate)
from qistudio.models.dit import QwenImageDiT
from qistudio.ops.rope import ImageGrid, qwen_rotary
from qistudio.weights.build import empty_parameters
from tiny_models import AXES, reference_dit

TOP_LEVEL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2")
NUM_BLOCK_LINEARS = 2 * 14  # per block: 2 modulation, 6 projections, 2 outputs, 2 x 2 MLP
FILE_SCALE = 2.0  # lora_files: alpha 8 / rank 4


def _quantized(reference, dtype=torch.float32):
    dit = our_dit(reference)
    quantize_linears(dit)
    return dit.to(dtype)


def _plain_with_dequantized_weights(reference, quantized, dtype=torch.float32):
    """A plain DiT (nn.Linear everywhere) holding the FP8 model's dequantised weights.

    Frozen like a loaded model: on the CPU, F.linear on a non-contiguous input picks another float32 kernel for a
    weight that requires grad (5e-8 apart), which is not what this comparison is about.
    """
    plain = our_dit(reference).to(dtype).requires_grad_(False)
    state = plain.state_dict()
    for name, module in quantized.named_modules():
        if isinstance(module, FP8Linear):
            state[f"{name}.weight"] = module.dequantized_weight(dtype)
    plain.load_state_dict(state)
    return plain


def _random_linear(in_features, out_features, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(out_features, generator=g) * 0.05)
    return linear.to(dtype)


# --- one layer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 64), (64, 256)])
def test_from_linear_rounds_each_weight_within_e4m3s_bound(shape):
    in_features, out_features = shape
    linear = _random_linear(in_features, out_features)
    layer = FP8Linear.from_linear(linear)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.shape == (out_features, in_features)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (out_features,)
    assert not layer.weight.requires_grad and not layer.weight_scale.requires_grad
    assert (layer.in_features, layer.out_features, layer.compute_dtype) == (in_features, out_features, torch.float32)

    weight, scale = linear.weight.detach(), layer.weight_scale
    assert (torch.frexp(scale).mantissa == 0.5).all()  # powers of two
    assert (weight.abs().amax(1) / scale <= 448).all() and (weight.abs().amax(1) / scale > 112).all()
    # Round to nearest with 3 mantissa bits: within 2^-4 of the value, or half the subnormal step 2^-9 of the scale.
    error = (layer.dequantized_weight() - weight).abs()
    assert (error <= torch.maximum(weight.abs() / 16, scale[:, None] / 1024)).all()
    assert 0.015 < rel_err(layer.dequantized_weight(), weight) < 0.035  # measured 0.026

    x = torch.randn(100, in_features, generator=torch.Generator().manual_seed(1))
    assert rel_err(layer(x), linear(x)) < 0.04  # measured 0.026 / 0.027
    assert "storage=float8_e4m3fn, compute_dtype=float32" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_layer_is_exactly_a_linear_on_its_dequantized_weight(dtype):
    layer = FP8Linear.from_linear(_random_linear(64, 96, dtype))
    assert layer.compute_dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(2, 7, 64).to(dtype)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(), layer.bias))
    # Power-of-two scales: the dequantised weight is exact in every compute dtype.
    assert torch.equal(layer.dequantized_weight(dtype).float(), layer.dequantized_weight(torch.float32))


def test_zero_rows_and_non_finite_weights():
    weight = torch.randn(4, 64)
    weight[2] = 0
    quantized, scale = quantize_weight(weight)
    assert scale[2] == 1 and not quantized.float()[2].any() and torch.isfinite(quantized.float()).all()
    weight[1, 3] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight(weight)


# --- the DiT ------------------------------------------------------------------------------------------------------


def test_quantize_linears_replaces_the_block_linears_only(reference):
    dit = our_dit(reference)
    keys = set(dit.state_dict())
    assert quantize_linears(dit) == NUM_BLOCK_LINEARS
    fp8 = [name for name, module in dit.named_modules() if isinstance(module, FP8Linear)]
    assert len(fp8) == NUM_BLOCK_LINEARS and all(dit_fp8_predicate(name, None) for name in fp8)
    assert all(type(dit.get_submodule(name)) is nn.Linear for name in TOP_LEVEL)
    assert not [m for n, m in dit.named_modules() if type(m) is nn.Linear and n.startswith("transformer_blocks.")]
    # Same names: the state dict keeps every key and adds one scale per FP8 layer.
    assert set(dit.state_dict()) == keys | {f"{name}.weight_scale" for name in fp8}
    assert quantize_linears(dit) == 0  # already done


def test_dit_output_within_fp8_tolerance(reference, inputs):
    float32 = inputs.ours(our_dit(reference))
    assert rel_err(inputs.ours(_quantized(reference)), float32) < 0.012  # measured 0.0053
    bfloat16 = inputs.ours(our_dit(reference).to(torch.bfloat16), torch.bfloat16)
    quantized = inputs.ours(_quantized(reference, torch.bfloat16), torch.bfloat16)
    assert rel_err(quantized, bfloat16) < 0.016  # measured 0.0075


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_equals_the_plain_path_on_dequantized_weights(reference, inputs, dtype):
    quantized = _quantized(reference, dtype)
    plain = _plain_with_dequantized_weights(reference, quantized, dtype)
    assert torch.equal(inputs.ours(quantized, dtype), inputs.ours(plain, dtype))


def test_state_dict_round_trip(reference, inputs, tmp_path):
    quantized = _quantized(reference, torch.bfloat16)
    save_file(quantized.state_dict(), tmp_path / "fp8.safetensors")
    state = load_file(tmp_path / "fp8.safetensors")
    assert state["transformer_blocks.0.attn.to_q.weight"].dtype == FP8_DTYPE
    expected = inputs.ours(quantized, torch.bfloat16)

    with empty_parameters():  # built on the meta device, quantised there, then assigned
        fresh = QwenImageDiT(quantized.config)
    assert quantize_linears(fresh, compute_dtype=torch.bfloat16) == NUM_BLOCK_LINEARS
    fresh.load_state_dict(state, assign=True)
    assert torch.equal(inputs.ours(fresh.eval(), torch.bfloat16), expected)

    torch.manual_seed(1)  # real random weights, copied over in place
    other = QwenImageDiT(quantized.config)
    quantize_linears(other)
    other = other.to(torch.bfloat16).eval()
    assert not torch.equal(inputs.ours(other, torch.bfloat16), expected)
    other.load_state_dict(state)
    assert torch.equal(inputs.ours(other, torch.bfloat16), expected)


def test_to_moves_but_never_casts_the_stored_weights(reference, inputs):
    dit = _quantized(reference)
    layers = [m for m in dit.modules() if isinstance(m, FP8Linear)]
    stored = [(m.weight.view(torch.uint8).clone(), m.weight_scale.clone()) for m in layers]
    parameters = [m.weight for m in layers]

    def unchanged():
        return all(m.weight.dtype == FP8_DTYPE and m.weight_scale.dtype == torch.float32
                   and torch.equal(m.weight.view(torch.uint8), raw) and torch.equal(m.weight_scale, scale)
                   for m, (raw, scale) in zip(layers, stored))

    dit.to("cpu", torch.bfloat16)
    assert unchanged() and all(m.compute_dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16 for m in layers)
    assert dit.img_in.weight.dtype == torch.bfloat16 and dit.txt_norm.weight.dtype == torch.bfloat16
    assert all(m.weight is p for m, p in zip(layers, parameters))  # the same Parameter objects, as nn.Module.to
    assert rel_err(inputs.ours(dit, torch.bfloat16), inputs.ours(_quantized(reference, torch.bfloat16),
                                                                 torch.bfloat16)) == 0
    dit.half()
    assert unchanged() and all(m.compute_dtype == torch.float16 for m in layers)
    dit.float()
    assert unchanged() and all(m.compute_dtype == torch.float32 for m in layers)
    dit.to("meta")  # a device move keeps the storage dtype too
    assert all(m.weight.is_meta and m.weight.dtype == FP8_DTYPE and m.weight_scale.is_meta for m in layers)


# --- LoRA beside FP8 weights -----------------------------------------------------------------------------------------


def test_unfused_lora_on_fp8_layers_equals_merging_into_the_dequantized_weights(reference, inputs):
    dit = _quantized(reference)
    base = inputs.ours(dit)
    pairs = random_pairs(dit)  # block linears (FP8) and top-level ones (float) alike
    assert any(isinstance(dit.get_submodule(n), FP8Linear) for n in pairs)
    name = load_lora(dit, peft_layout(pairs), alpha=0.7)

    plain = _plain_with_dequantized_weights(reference, dit)
    plain.load_state_dict(merged(plain, pairs, 0.7 * FILE_SCALE))
    assert rel_err(inputs.ours(dit), inputs.ours(plain)) <= 1e-5

    set_lora_scale(dit, name, 0.0)
    assert torch.equal(inputs.ours(dit), base)
    set_lora_scale(dit, name, 1.0)
    down = lora_tensors(dit, name)[0].requires_grad_(True)  # gradients reach the LoRA through the FP8 layers
    rotary = qwen_rotary([ImageGrid(0, inputs.h, inputs.w)], inputs.text_len, axes_dim=AXES)
    dit(inputs.tokens, inputs.text, inputs.sigma, rotary).square().mean().backward()
    assert down.grad is not None and down.grad.abs().sum() > 0
    unload_lora(dit)
    assert torch.equal(inputs.ours(dit), base)


def test_fusing_into_fp8_weights_raises_and_changes_nothing(reference, inputs):
    dit = _quantized(reference)
    base, state = inputs.ours(dit), {k: v.clone() for k, v in dit.state_dict().items()}
    lora = peft_layout(random_pairs(dit))
    with pytest.raises(LoRAError, match="FP8Linear stores its weight in torch.float8_e4m3fn: unfused LoRAs work on "
                                        "FP8 weights, but fusing would .*fuse=False"):
        load_lora(dit, lora, fuse=True)
    assert list_loras(dit) == [] and torch.equal(inputs.ours(dit), base)

    name = load_lora(dit, lora)
    with_lora = inputs.ours(dit)
    with pytest.raises(LoRAError, match="cannot fuse into .* layers"):
        fuse_lora(dit, name)
    assert not list_loras(dit)[0].fused and torch.equal(inputs.ours(dit), with_lora)
    unload_lora(dit)
    after = dit.state_dict()
    assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype == FP8_DTYPE
               else torch.equal(after[k], v) for k, v in state.items())


def test_loras_on_the_float_layers_of_an_fp8_model_still_fuse(reference, inputs):
    dit = _quantized(reference)
    pairs = random_pairs(dit, targets=("img_in", "proj_out", "norm_out.linear"))
    load_lora(dit, peft_layout(pairs), fuse=True)
    assert list_loras(dit)[0].fused


def test_quantizing_a_layer_that_carries_a_lora_raises(reference):
    dit = our_dit(reference)
    load_lora(dit, peft_layout(random_pairs(dit, targets=TARGETS[:2])))
    with pytest.raises(ValueError, match="carry hooks.*quantise to FP8 first"):
        quantize_linears(dit)


# --- the text encoder ---------------------------------------------------------------------------------------------


def test_text_encoder_decoder_linears_only():
    from qistudio.demo import demo_text_encoder_config
    from qistudio.models.text_encoder import QwenImageTextEncoder
    from tiny_models import _perturb

    torch.manual_seed(0)
    config = demo_text_encoder_config()
    config.text_config.vocab_size = 512
    encoder = _perturb(QwenImageTextEncoder(config), 0.02)
    ids = torch.tensor([[5, 17, 301, 44, 9, 2]])
    with torch.no_grad():
        expected = encoder(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="text_encoder_fp8_predicate"):
        quantize_linears(encoder)  # the DiT's default matches nothing here
    assert quantize_linears(encoder, text_encoder_fp8_predicate) == 2 * 7  # q, k, v, o, gate, up, down per layer
    fp8 = [name for name, module in encoder.named_modules() if isinstance(module, FP8Linear)]
    assert all(name.startswith("model.language_model.layers.") for name in fp8)
    assert any(type(m) is nn.Linear for n, m in encoder.named_modules() if n.startswith("model.visual."))
    with torch.no_grad():
        assert rel_err(encoder(ids, torch.ones_like(ids)), expected) < 0.08  # measured 0.036


def test_a_saved_fp8_dit_loads_dequantised(tmp_path):
    """Our FP8 state dict (per-channel `weight_scale`) loads through the loader as a plain DiT (dequantised on load)."""
    from safetensors.torch import save_file

    from lora_files import Inputs, our_dit
    from qistudio.memory.fp8_linear import quantize_linears
    from qistudio.weights.build import load_model
    from tiny_models import reference_dit

    dit = our_dit(reference_dit())
    quantize_linears(dit)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp_path / "fp8.safetensors"))
    _, loaded = load_model([tmp_path / "fp8.safetensors"], dtype=torch.float32)
    assert torch.equal(Inputs().ours(loaded), Inputs().ours(dit))


def test_fp8_compute_switch_falls_back_off_the_gpu(reference, inputs):
    """W8A8 runs through torch._scaled_mm on a GPU only; elsewhere the switch leaves the dequantised path."""
    from qistudio.memory.fp8_linear import set_fp8_compute

    dit = our_dit(reference)
    quantize_linears(dit)
    before = inputs.ours(dit)
    assert set_fp8_compute(dit, True) == NUM_BLOCK_LINEARS
    assert torch.equal(inputs.ours(dit), before)
    assert set_fp8_compute(dit, False) == NUM_BLOCK_LINEARS


def test_an_fp8_matmul_cublaslt_cannot_run_falls_back_to_the_dequantised_product(monkeypatch):
    """cuBLASLt refuses some row counts with row-wise scales (CUBLAS_STATUS_NOT_SUPPORTED); that product then runs
    on the dequantised operands, with a warning, and any other error still raises."""
    from qistudio.ops.fp8 import quantize_rows

    layer = FP8Linear.from_linear(_random_linear(64, 96, torch.float32))
    x = torch.randn(34, 64, generator=torch.Generator().manual_seed(2))
    rows, scale = quantize_rows(x)

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmulAlgoGetHeuristic(...)`")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with pytest.warns(RuntimeWarning, match="no FP8 matmul for activations"):
        out = layer._scaled_mm(rows, scale, x.shape, torch.float32)
    expected = nn.functional.linear(rows.float() * scale, layer.dequantized_weight(torch.float32), layer.bias)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        layer._scaled_mm(rows, scale, x.shape, torch.float32)
