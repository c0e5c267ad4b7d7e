"""Training in little memory on the CPU: a LoRA over an FP8 base computes exactly what it computes over the
dequantised weights (and keeps no dequantised copy for the backward); streamed frozen blocks give exactly the
resident gradients and weights, step after step; the saved LoRA is the normal path's; the settings' refusals.

On the CPU the streamer's device slots are separate buffers, so a slot refilled while autograd still reads it gives
wrong gradients here as it would on a GPU (the inference streamer, used for training, fails these tests).
"""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from qistudio.cli.main import main
from qistudio.memory.fp8_linear import FP8_DTYPE, FP8Linear
from qistudio.models.dit import DiTConfig, QwenImageDiT
from qistudio.ops.rope import ImageGrid, qwen_rotary
from qistudio.training import DataConfig, Trainer, TrainConfig
from qistudio.training.adapters import add_lora, trainable_named_parameters
from qistudio.training.lowmem import load_device, place_dit, plan_blocks, prepare_dit
from qistudio.training.optim import make_optimizer
from test_training import base, data, fresh, make_config  # noqa: F401  (fixtures)
from test_training_cli import base_args

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = DiTConfig(num_layers=5, num_heads=2, head_dim=16, text_dim=24, axes_dim=(4, 6, 6))
LORA = TrainConfig(DataConfig("unused", "unused"), model_paths=("unused",), lora_base_model="dit", lora_rank=4,
                   learning_rate=1e-2)


def lora_dit(seed: int = 0) -> QwenImageDiT:
    """A tiny 5-block DiT with a rank-4 LoRA whose factors are all non-zero (so every factor gets a gradient)."""
    torch.manual_seed(seed)
    dit = QwenImageDiT(CONFIG)
    add_lora(dit, LORA)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in trainable_named_parameters(dit).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dit.gradient_checkpointing = True
    return dit.train()


class Batch:
    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randn(1, 12, 64, generator=g)
        self.text = torch.randn(1, 5, CONFIG.text_dim, generator=g)
        self.target = torch.randn(1, 12, 64, generator=g)
        self.sigma = torch.rand(1, generator=g)
        self.rotary = qwen_rotary([ImageGrid(0, 3, 4)], 5, axes_dim=CONFIG.axes_dim)

    def loss(self, dit) -> torch.Tensor:
        return (dit(self.tokens, self.text, self.sigma, self.rotary) - self.target).square().mean()


def gradients(dit, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = batch.loss(dit)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable_named_parameters(dit).items() if p.grad is not None}
    dit.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(ours[k], expected[k])]
    assert not different, f"{len(different)} of {len(expected)} differ, first {different[0]}"


def dequantised_copy(quantised: QwenImageDiT, plain: QwenImageDiT) -> QwenImageDiT:
    """`plain` (same LoRA, nn.Linear bases) with each base weight replaced by the FP8 model's dequantised one."""
    plain = copy.deepcopy(plain)
    layers = dict(quantised.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            if isinstance(layers.get(name), FP8Linear):
                module.weight.copy_(layers[name].dequantized_weight(torch.float32))
    return plain


# --- FP8 base ------------------------------------------------------------------------------------------------------


def test_fp8_base_lora_gradients_equal_the_dequantised_reference():
    dit = lora_dit()
    dit.gradient_checkpointing = False  # what the forward saves for the backward is inspected below
    quantised = copy.deepcopy(dit)
    layers, streamer = place_dit(quantised, "cpu", fp8=True, streamed=[])
    assert layers == CONFIG.num_layers * 14 and streamer is None
    assert all(isinstance(m.base_layer, FP8Linear) for n, m in quantised.named_modules() if n.endswith("attn.to_q"))
    assert not any(isinstance(m, FP8Linear) for n, m in quantised.named_modules() if "lora_" in n or "blocks" not in n)
    reference = dequantised_copy(quantised, dit)

    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    batch = Batch(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = gradients(quantised, batch)
    expected_loss, expected = gradients(reference, batch)
    assert torch.equal(loss, expected_loss)
    assert_same(grads, expected)
    # The backward through the frozen base keeps each block weight as float8, never as a float32 copy.
    block_weights = {tuple(m.weight.shape) for m in quantised.modules() if isinstance(m, FP8Linear)}
    assert any(dtype == FP8_DTYPE for dtype, shape in saved)
    assert not [shape for dtype, shape in saved if shape in block_weights and dtype != FP8_DTYPE]


# --- streaming -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed, fp8", [([0, 1, 2, 3, 4], False), ([0, 2, 3], False), ([1, 4], True)])
def test_streamed_training_equals_resident(streamed, fp8):
    """Gradients and three AdamW steps, bit for bit; slots are reused across steps (fewer copies than blocks)."""
    resident, ours = lora_dit(), lora_dit()
    place_dit(resident, "cpu", fp8, streamed=[])
    _, streamer = place_dit(ours, "cpu", fp8, streamed)
    frozen = [p for p in ours.transformer_blocks[streamed[0]].parameters() if not p.requires_grad]
    assert all(p.data_ptr() != 0 for p in frozen)
    optimizers = [make_optimizer(trainable_named_parameters(m).values(), LORA) for m in (resident, ours)]
    for step in range(3):
        batch = Batch(step)
        (loss, grads), (expected_loss, expected) = gradients(ours, batch), gradients(resident, batch)
        assert torch.equal(loss, expected_loss)
        assert_same(grads, expected)
        for model, optimizer in zip((resident, ours), optimizers):
            batch.loss(model).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert_same(trainable_named_parameters(ours), trainable_named_parameters(resident))
    per_step = 2 * len(streamed)  # forward and backward, were nothing reused
    assert streamer.copies < 9 * per_step
    with torch.no_grad():  # an evaluation between steps streams too
        assert torch.equal(batch.loss(ours), batch.loss(resident))
    streamer.detach()
    assert torch.equal(batch.loss(ours), batch.loss(resident))  # host copies hold the same bits


def test_streaming_needs_gradient_checkpointing():
    dit = lora_dit()
    dit.gradient_checkpointing = False
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        place_dit(dit, "cpu", False, streamed=[1, 3])
    dit.gradient_checkpointing = True
    place_dit(dit, "cpu", False, streamed=[1, 3])
    dit.gradient_checkpointing = False
    with pytest.raises(RuntimeError, match="need gradient checkpointing when gradients are on"):
        Batch(0).loss(dit)


def test_full_dit_training_is_refused():
    dit = QwenImageDiT(CONFIG).requires_grad_(True)
    with pytest.raises(ValueError, match="keep the DiT's base frozen"):
        prepare_dit(dit, "cpu", fp8=True, vram_limit=None, image_tokens=16)


def test_the_plan_streams_what_the_budget_cannot_hold():
    dit = lora_dit()
    everything = plan_blocks(dit, 1.0, fp8=False, image_tokens=16)
    assert everything.models["dit"].mode == "resident"
    minimal = plan_blocks(dit, 0, fp8=True, image_tokens=16)
    assert minimal.models["dit"].streamed_blocks == CONFIG.num_layers
    with pytest.raises(ValueError, match="training within vram_limit=1e-05: .*smallest workable budget"):
        plan_blocks(dit, 1e-5, fp8=False, image_tokens=16)


# --- the trainer -----------------------------------------------------------------------------------------------------


def test_trainer_streams_to_the_resident_weights_and_saves_the_same_keys(tiny_repo, base, data, tmp_path):  # noqa: F811
    settings = dict(max_steps=2, use_gradient_checkpointing=True, data=dict(height=32, width=32))
    runs = {}
    for name, extra in [("resident", {}), ("streamed", dict(vram_limit=0.0)),
                        ("fp8_streamed", dict(fp8_base=True, vram_limit=0.0))]:
        config = make_config(tiny_repo, data, tmp_path / name, **settings, **extra)
        trainer = Trainer(config, components=fresh(base), progress_bar=False)
        trainer.run()
        runs[name] = (trainer, load_file(tmp_path / name / "step-2.safetensors"))
    assert runs["streamed"][0].low_memory.streamer is not None
    assert_same(runs["streamed"][1], runs["resident"][1])
    assert [r.loss for r in runs["streamed"][0].history] == [r.loss for r in runs["resident"][0].history]
    fp8 = runs["fp8_streamed"][1]
    assert {k: v.shape for k, v in fp8.items()} == {k: v.shape for k, v in runs["resident"][1].items()}
    assert all(torch.isfinite(v).all() for v in fp8.values())
    assert any(not torch.equal(fp8[k], runs["resident"][1][k]) for k in fp8)  # it trained, over other weights


def test_trainer_on_an_fp8_base_equals_training_on_the_dequantised_base(tiny_repo, base, data, tmp_path):  # noqa: F811
    config = make_config(tiny_repo, data, tmp_path / "fp8", max_steps=2, fp8_base=True,
                         data=dict(height=32, width=32))
    ours = Trainer(config, components=fresh(base), progress_bar=False)
    ours.run()
    # The reference: the same DiT with each block linear holding the FP8 model's dequantised weight.
    components = fresh(base)
    quantised = {n.replace(".base_layer", ""): m for n, m in ours.dit.named_modules() if isinstance(m, FP8Linear)}
    with torch.no_grad():
        for name, module in components.dit.named_modules():
            if name in quantised:
                module.weight.copy_(quantised[name].dequantized_weight(torch.float32))
    reference = Trainer(dataclasses.replace(config, fp8_base=False, output_path=str(tmp_path / "ref")),
                        components=components, progress_bar=False)
    reference.run()
    assert [r.loss for r in ours.history] == [r.loss for r in reference.history]
    assert_same(load_file(tmp_path / "fp8" / "step-2.safetensors"), load_file(tmp_path / "ref" / "step-2.safetensors"))


# --- settings ------------------------------------------------------------------------------------------------------


def test_settings_are_checked_before_loading(tiny_repo, data, tmp_path, capsys):  # noqa: F811
    args = base_args(tiny_repo, data, tmp_path / "out") + ["--lora_base_model", "dit"]
    with pytest.raises(SystemExit):
        main(args + ["--vram_limit", "8"])
    assert "with --use_gradient_checkpointing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args[:-2] + ["--trainable_models", "dit", "--fp8_base"])
    assert "cannot train the whole DiT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--vram_limit", "-1", "--use_gradient_checkpointing"])
    assert "vram_limit must be >= 0" in capsys.readouterr().err


def test_models_load_into_host_memory_for_fp8_and_streaming():
    cuda = torch.device("cuda")
    assert load_device(LORA, cuda) == cuda  # neither option: as before
    assert load_device(dataclasses.replace(LORA, fp8_base=True), cuda) == torch.device("cpu")
    # Several processes stream too (tests/test_training_distributed.py trains so under DDP).
    assert load_device(dataclasses.replace(LORA, vram_limit=8.0, use_gradient_checkpointing=True), cuda) == \
        torch.device("cpu")


def test_cli_trains_on_an_fp8_streamed_base(tiny_repo, data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    args = base_args(tiny_repo, data, out) + ["--lora_base_model", "dit", "--lora_rank", "4", "--max_steps", "1",
                                               "--height", "32", "--width", "32", "--fp8_base", "--vram_limit", "0",
                                               "--use_gradient_checkpointing"]
    assert main(args) == 0
    saved = load_file(out / "step-1.safetensors")
    assert saved and all(k.startswith("transformer.transformer_blocks.") for k in saved)
    config = json.loads((out / "training_config.json").read_text())
    assert config["fp8_base"] is True and config["vram_limit"] == 0.0
