"""Optimizers that keep less per parameter: AdamW with bfloat16 moments, and any optimizer stepped inside the
backward pass so that no gradient outlives its parameter's step.

Design note. Per trained parameter, AdamW keeps the weight, its gradient and two moments. For the 20B DiT in
bf16 that is 2 + 2 + 2 + 2 bytes: 160 GB before activations. Two of the options here cut it (optim.py lists all):
- `BF16AdamW`: the moments stored in bfloat16 whatever the parameter's dtype, the update computed in float32
  from them (torch's AdamW keeps them in the parameter's dtype: float32 for LoRA factors and CPU runs). It is
  decoupled-weight-decay AdamW with bias correction, torch's formula; the moments are rounded to bfloat16 after
  each update (round to nearest), which is what costs precision.
- `StepInBackward`: one inner optimizer per parameter, stepped by the parameter's post-accumulate-grad hook the
  moment its gradient is complete, which then frees that gradient. At most the gradients of the parameters whose
  backward is running at that moment exist at once, instead of the whole model's (41 GB for the 20B DiT in bf16).
  The result is the plain step's: each parameter's update reads only its own gradient and state. So there is no
  gradient to accumulate (gradient_accumulation_steps must be 1), and it runs in one process: under DDP the hook
  would fire before the gradient is averaged across processes. The LR schedule acts on the inner optimizers'
  parameter groups, which `param_groups` lists; `step()` and `zero_grad()` have nothing left to do.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (torch's formula) whose moments are stored in bfloat16."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                grad = param.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denominator = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                update = exp_avg.div_(denominator).mul_(group["lr"] / (1 - beta1**step))
                weights = param.float().mul_(1 - group["lr"] * group["weight_decay"]).sub_(update)
                param.copy_(weights)
        return loss


class StepInBackward(torch.optim.Optimizer):
    """`make([param])` per parameter, stepped in the backward by the parameter's post-accumulate-grad hook."""

    def __init__(self, params: Iterable[torch.Tensor], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        # Not Optimizer.__init__: the state lives in the inner optimizers; the LR scheduler needs param_groups.
        self.params = list(params)
        self.inner = [make([param]) for param in self.params]
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]
        self.defaults = dict(self.inner[0].defaults) if self.inner else {}
        self.state = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self.handles = [param.register_post_accumulate_grad_hook(self._step_hook(optimizer))
                        for param, optimizer in zip(self.params, self.inner)]

    @staticmethod
    def _step_hook(optimizer: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            optimizer.step()
            param.grad = None  # applied: the gradient's memory goes back at once

        return step

    def step(self, closure: Callable | None = None):
        return None if closure is None else closure()  # every parameter stepped in the backward already

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # each gradient was freed by its own step

    def state_dict(self) -> dict:
        return {"inner": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        inner = state_dict.get("inner") if isinstance(state_dict, dict) else None
        if not isinstance(inner, list) or len(inner) != len(self.inner):
            raise ValueError(f"an optimizer state of {len(inner) if isinstance(inner, list) else 'no'} fused "
                             f"per-parameter steps for {len(self.inner)} parameters")
        for optimizer, state in zip(self.inner, inner):
            optimizer.load_state_dict(state)
