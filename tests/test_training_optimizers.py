"""Memory-lean optimisation: AdamW with bfloat16 moments, 8-bit AdamW, Adafactor and the step fused into the
backward each keep what they promise per parameter, train through the Trainer and resume exactly; the fused step
equals the plain one and leaves no gradient behind."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from qistudio.training import Trainer
from qistudio.training.config import OPTIMIZERS
from qistudio.training.lean_optim import BF16AdamW
from qistudio.training.optim import make_optimizer
from test_training import base, data, fresh, make_config, train  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bf16_adamw_is_torch_adamw_with_bfloat16_moments():
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(64, 32))
    reference.data.copy_(ours.data)
    mine, theirs = BF16AdamW([ours], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([reference], lr=1e-2,
                                                                                    weight_decay=0.1)
    for step in range(10):
        gradient = torch.randn(64, 32)
        ours.grad, reference.grad = gradient.clone(), gradient.clone()
        mine.step()
        theirs.step()
        if step == 0:  # the first update reads the moments before they are rounded
            assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    assert {v.dtype for k, v in mine.state[ours].items() if k != "step"} == {torch.bfloat16}
    # Later updates read bfloat16 moments: off by their rounding (2^-8 relative), a fraction of one step's size.
    assert float((ours - reference).detach().abs().max()) < 0.1 * 1e-2


def state_bytes_per_parameter(name: str) -> float:
    param = torch.nn.Parameter(torch.randn(512, 256))
    config = make_config_stub(optimizer=name)
    optimizer = make_optimizer([param], config)
    param.grad = torch.randn_like(param)
    optimizer.step()
    states = optimizer.state[param].values()
    return sum(v.numel() * v.element_size() for v in states if isinstance(v, torch.Tensor)) / param.numel()


def make_config_stub(**overrides):
    from qistudio.training.config import DataConfig, TrainConfig

    return TrainConfig(DataConfig(".", "."), trainable_models="dit", model_paths=("x",), **overrides)


def test_each_optimizer_keeps_what_it_promises_per_parameter():
    """Optimizer state per float32 parameter: AdamW 8 bytes, bf16 moments 4, 8-bit about 2, Adafactor a row and
    a column per matrix."""
    assert set(OPTIMIZERS) == {"adamw", "adamw_bf16", "adamw_8bit", "adafactor"}
    measured = {name: state_bytes_per_parameter(name) for name in OPTIMIZERS}
    assert measured["adamw"] == pytest.approx(8, abs=0.01)  # + the step counter
    assert measured["adamw_bf16"] == pytest.approx(4, abs=0.01)
    assert 2 <= measured["adamw_8bit"] < 2.1  # two uint8 moments + per-block scales
    assert measured["adafactor"] < 0.05  # (512 + 256) floats for 512 x 256


@pytest.mark.parametrize("optimizer", ["adamw_bf16", "adamw_8bit", "adafactor"])
def test_lean_optimizers_train_and_resume_exactly(base, tiny_repo, data, tmp_path, optimizer):  # noqa: F811
    """Two steps straight equal one step, a checkpoint (the optimizer's state in qistudio's pickle-free files)
    and a resumed step."""
    straight = train(base, make_config(tiny_repo, data, tmp_path / "straight", max_steps=2, optimizer=optimizer,
                                       learning_rate=1e-2))
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in straight.history)
    train(base, make_config(tiny_repo, data, tmp_path / "resumed", max_steps=1, optimizer=optimizer,
                            learning_rate=1e-2))
    resumed = Trainer(make_config(tiny_repo, data, tmp_path / "resumed", max_steps=2, optimizer=optimizer,
                                  learning_rate=1e-2), components=fresh(base), resume="latest", progress_bar=False)
    resumed.run()
    a, b = (load_file(tmp_path / run / "step-2.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it trained


def test_fused_step_trains_as_the_plain_step_and_frees_each_gradient(base, tiny_repo, data, tmp_path):  # noqa: F811
    """--fused_optimizer_step on the whole DiT: the weights after 3 steps equal the plain step's; after a
    backward no gradient is left and the weights have moved (the step ran inside the backward)."""
    runs = {}
    for fused in (False, True):
        config = make_config(tiny_repo, data, tmp_path / str(fused), trainable_models="dit", max_steps=3,
                             learning_rate=1e-4, fused_optimizer_step=fused)
        runs[fused] = load_file(train(base, config).last_saved)
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.allclose(runs[True][k], runs[False][k], atol=1e-7, rtol=0) for k in runs[True])

    config = make_config(tiny_repo, data, tmp_path / "probe", trainable_models="dit", max_steps=3,
                         learning_rate=1e-4, fused_optimizer_step=True)
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    trained = [p for p in trainer.trained_module.parameters() if p.requires_grad]
    before = [copy.deepcopy(p.detach()) for p in trained]
    trainer.progress.position = 1  # the first sample of the order, as the loop would take it
    trainer._micro_batch(trainer.dataset[trainer._order(0)[0]], 1.0, sync=True)
    trainer.release_lock()
    assert all(p.grad is None for p in trained)
    assert all(not torch.equal(p, old) for p, old in zip(trained, before))


def test_memory_lean_settings_that_cannot_work_are_refused(base, tiny_repo, data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="there is none to accumulate"):
        make_config(tiny_repo, data, tmp_path, fused_optimizer_step=True, gradient_accumulation_steps=2).check()
    with pytest.raises(ValueError, match="fused_optimizer_step runs in one process without DeepSpeed or FSDP"):
        Trainer(make_config(tiny_repo, data, tmp_path / "a", trainable_models="dit", fsdp=True,
                            fused_optimizer_step=True), progress_bar=False)
    with pytest.raises(ValueError, match="adamw_8bit .* cannot step FSDP's"):
        Trainer(make_config(tiny_repo, data, tmp_path / "b", trainable_models="dit", fsdp=True,
                            optimizer="adamw_8bit"), progress_bar=False)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        make_config(tiny_repo, data, tmp_path, optimizer="sgd").check()
