"""Quantised DiTs with the rest of the library: LoRAs beside the quantised linears, the VRAM planner and block
streaming, regional compile, dtype moves: each against the plain path on the same dequantised weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from conftest import rel_err  # noqa: E402
from gguf_files import mixed_types, write_gguf  # noqa: E402
from lora_files import TARGETS, Inputs, peft_layout, random_pairs  # noqa: E402
from qistudio.lora import load_lora, unload_lora  # noqa: E402
from qistudio.lora.errors import LoRAError  # noqa: E402
from qistudio.memory.quant_linear import QuantizedLinear, quantized_linears  # noqa: E402
from qistudio.weights.build import load_model  # noqa: E402
from tiny_models import reference_dit  # noqa: E402

TYPES = ("Q8_0", "Q4_0", "Q5_1", "IQ4_NL")  # rows of 32 fit the tiny DiT's 64-wide linears


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("runtime") / "dit.gguf", reference_dit().state_dict(),
                      mixed_types(TYPES))


def quantized_dit(path):
    return load_model([path], dtype=torch.float32)[1]


def dense_twin(dit):
    """The same DiT with every QuantizedLinear replaced by an nn.Linear holding its dequantised weight."""
    import copy

    twin = copy.deepcopy(dit)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features)
            linear.weight.data, linear.bias.data = module.dequantized_weight(torch.float32), module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear.requires_grad_(False))
    return twin


def test_a_lora_beside_quantized_linears_equals_it_on_the_dequantized_weights(gguf_path):
    dit = quantized_dit(gguf_path)
    twin = dense_twin(dit)
    assert isinstance(dit.get_submodule(TARGETS[0]), QuantizedLinear)
    pairs = random_pairs(twin)
    inputs = Inputs()
    base = inputs.ours(dit)
    load_lora(dit, peft_layout(pairs), alpha=0.7, name="style")
    load_lora(twin, peft_layout(pairs), alpha=0.7, name="style")
    with_lora = inputs.ours(dit)
    assert rel_err(with_lora, base) > 1e-3 and rel_err(with_lora, inputs.ours(twin)) < 1e-6
    with pytest.raises(LoRAError, match=r"stores its weight quantised \(Q.*\): unfused LoRAs work on it"):
        load_lora(dit, peft_layout(pairs), name="fused", fuse=True)
    unload_lora(dit)
    assert torch.equal(inputs.ours(dit), base)


def test_block_streaming_and_the_planner_on_quantized_bytes(gguf_path):
    """The memory planner counts the stored bytes; streamed quantised blocks give the resident result."""
    from qistudio.memory.manager import MemoryManager, model_size
    from qistudio.memory.plan import MemoryPlan, ModelPlan

    dit = quantized_dit(gguf_path)
    inputs = Inputs()
    expected = inputs.ours(dit)
    stored = sum(t.numel() * t.element_size() for t in (*dit.parameters(), *dit.buffers()))
    dense = sum(t.numel() * 4 for layer in quantized_linears(dit) for t in (layer.dequantized_weight(),))
    size = model_size("dit", dit)
    assert size.total_bytes == stored and stored < dense  # quantised weights: a fraction of their float32 size
    manager = MemoryManager({"dit": dit}, "cpu", MemoryPlan(0, {"dit": ModelPlan("stream", 0, 2)}))
    with manager.phase("denoise", "dit"):
        for _ in range(2):
            assert torch.equal(inputs.ours(dit), expected)
    manager.teardown()
    assert torch.equal(inputs.ours(dit), expected)


def test_pipeline_with_vram_management_equals_the_plain_call(gguf_path, tiny_repo):
    from qistudio import ModelConfig, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(gguf_path)), ModelConfig(path=str(tiny_repo / "text_encoder")),
                       ModelConfig(path=str(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"))],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )  # fmt: skip
    kwargs = dict(prompt="a kite", height=48, width=64, num_inference_steps=2, seed=1, output_type="latent",
                  progress_bar_cmd=lambda x: x)
    plain = pipe(**kwargs)
    plan = pipe.enable_vram_management(vram_limit=0)
    assert plan.models["dit"].mode == "stream"
    assert torch.equal(pipe(**kwargs), plain)


def test_offload_to_disk_is_refused_for_a_quantized_file(gguf_path, tiny_repo):
    from qistudio import ModelConfig, QwenImagePipeline

    with pytest.raises(ValueError, match=r"stored as Q.*offload_device='disk' streams float weights.*use "
                                         "offload_device='cpu'"):
        QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=str(gguf_path), offload_device="disk")])


def test_regional_compile_traces_quantized_blocks_whole(gguf_path):
    """fullgraph: the dequantisation traces with the block (a graph break would be an error)."""
    from qistudio.compile import compile_repeated_blocks

    torch._dynamo.reset()
    dit = quantized_dit(gguf_path)
    inputs = Inputs()
    eager = inputs.ours(dit)
    compile_repeated_blocks(dit, backend="aot_eager")
    assert rel_err(inputs.ours(dit), eager) < 1e-6
    torch._dynamo.reset()


def test_dtype_moves_keep_the_stored_bytes(gguf_path):
    dit = quantized_dit(gguf_path)
    layer = quantized_linears(dit)[0]
    stored = layer.weight.clone()
    dit.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, stored)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(torch.bfloat16), layer.bias)
    assert torch.equal(layer(x), expected)


def test_the_plan_counts_a_q4_k_m_dits_stored_bytes_block_by_block(tmp_path):
    """Q4_K_M stores some blocks' value and down projections in Q6_K, so blocks differ in size: the planner's byte
    counts are the file's quantised bytes (not bf16's), the largest block sizes the slots, their sum the rest."""
    from gguf_files import reference_wide_dit

    from qistudio.memory.manager import DIT_ACTIVATION, model_size
    from qistudio.memory.plan import NUM_SLOTS, plan_memory
    from qistudio.weights.gguf_io import read_gguf_layout
    from qistudio.weights.gguf_write import plan_types
    from qistudio.weights.gguf_write import write_gguf as write_q4

    state = {name: t.detach() for name, t in reference_wide_dit(num_layers=8).state_dict().items()}
    path = tmp_path / "dit-Q4_K_M.gguf"
    write_q4(path, {n: tuple(t.shape) for n, t in state.items()},
             plan_types({n: tuple(t.shape) for n, t in state.items()}, {n: t.dtype for n, t in state.items()},
                        "Q4_K_M"), state.__getitem__, "Q4_K_M")
    dit = load_model([path], dtype=torch.bfloat16)[1]
    # Expected bytes from the file: a quantised tensor as stored, a float one in the compute dtype (bf16).
    per_block = [0] * 8
    for name, tensor in read_gguf_layout(path)[0].items():
        if name.startswith("transformer_blocks."):
            quantised = tensor.type_name not in ("F32", "F16", "BF16")
            per_block[int(name.split(".")[1])] += tensor.nbytes if quantised else 2 * _count(tensor.shape)
    outside = sum(t.numel() * t.element_size() for name, t in (*dit.named_parameters(), *dit.named_buffers())
                  if not name.startswith("transformer_blocks."))
    size = model_size("dit", dit)
    assert min(per_block) < max(per_block)  # Q6_K in some blocks
    assert (size.block_bytes, size.main_blocks_bytes, size.non_block_bytes) == (max(per_block), sum(per_block),
                                                                                outside)
    bf16 = 2 * sum(_count(t.shape) for t in state.values())
    assert size.total_bytes < 0.45 * bf16
    budget = outside + NUM_SLOTS * max(per_block) + DIT_ACTIVATION + 3 * max(per_block) + 1
    plan = plan_memory(budget, {"dit": size})
    assert (plan.models["dit"].mode, plan.models["dit"].resident_blocks) == ("stream", 3)


def _count(shape) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count


def _mapped_file(pointer: int) -> str | None:
    """The file whose memory map holds address `pointer` in this process (/proc/self/maps), or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= pointer < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def test_offloading_a_quantized_model_keeps_its_weights_in_the_files_map(gguf_path):
    """Loaded into host memory, the quantised weights are views of the GGUF file's map, and the memory manager
    streams and visits them from there: no pinned copy (a Q4_K_M DiT and text encoder would not fit 16 GB twice),
    the same result, and afterwards the weights still in the file."""
    from qistudio.memory.manager import MemoryManager
    from qistudio.memory.mapped import MappedWeights, rests_in_place
    from qistudio.memory.offload import FlatWeights
    from qistudio.memory.plan import MemoryPlan, ModelPlan

    dit = quantized_dit(gguf_path)
    layers = quantized_linears(dit)
    assert {_mapped_file(layer.weight.data_ptr()) for layer in layers} == {str(gguf_path)}
    pointers = [layer.weight.data_ptr() for layer in layers]
    inputs = Inputs()
    expected = inputs.ours(dit)
    manager = MemoryManager({"dit": dit}, "cpu", MemoryPlan(0, {"dit": ModelPlan("stream", 1, 2)}))
    weights = [manager.offloads["dit"].weights, *manager.streamers["dit"][0].weights.values()]
    assert all(type(w) is MappedWeights and w.host is None for w in weights)
    with manager.phase("denoise", "dit"):
        assert torch.equal(inputs.ours(dit), expected)
    manager.release()
    assert [layer.weight.data_ptr() for layer in layers] == pointers  # back to the file's pages
    manager.teardown()
    assert torch.equal(inputs.ours(dit), expected)
    # A float model (nothing in a file map) rests in a pinned copy as before.
    dense = dense_twin(dit)
    assert rests_in_place(dit) and not rests_in_place(dense)
    float_manager = MemoryManager({"dit": dense}, "cpu", MemoryPlan(0, {"dit": ModelPlan("offload")}))
    assert type(float_manager.offloads["dit"].weights) is FlatWeights
