"""Memory of a full DiT training step per optimizer option, measured on the CPU on a shrunk DiT.

    python bench/train_memory.py                  # every option, each in a fresh process
    python bench/train_memory.py --layers 2 --heads 12

What each option keeps per trained parameter is the point (training/optim.py, lean_optim.py); the 20B DiT's
numbers follow by scaling. Each option runs in its own process, so the peak is its own: the DiT (random weights,
float32 as CPU training uses, the given width) is built, three optimizer steps run with per-block gradient
checkpointing on a small sample, and the process reports
  weights     bytes of the parameters
  states      bytes of the optimizer's state tensors after the steps (exact)
  grad peak   the most gradient bytes alive at once during a step (exact: summed by hooks each time a gradient
              is complete)
  rss         the process's peak resident memory (ru_maxrss) less what it held once the DiT and the optimizer
              were built: all the steps add (states, gradients, activations), allocator slack included
A row's `per param` is (states + grad peak) / parameters: what the option costs beside the weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIONS = {
    "adamw": dict(optimizer="adamw"),
    "adamw_bf16": dict(optimizer="adamw_bf16"),
    "adamw_8bit": dict(optimizer="adamw_8bit"),
    "adafactor": dict(optimizer="adafactor"),
    "adamw + fused step": dict(optimizer="adamw", fused_optimizer_step=True),
    "adafactor + fused step": dict(optimizer="adafactor", fused_optimizer_step=True),
}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class GradientMeter:
    """The most gradient bytes alive at once, looked at each time a parameter's gradient is complete (its hook runs
    before the fused step's, so the gradient just written counts)."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters, self.peak = parameters, 0
        for param in parameters:
            param.register_post_accumulate_grad_hook(self._written)

    def _written(self, _param: torch.Tensor) -> None:
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.parameters if p.grad is not None)
        self.peak = max(self.peak, live)


def measure(option: str, layers: int, heads: int, tokens: int) -> dict:
    from qistudio.models.dit import DiTConfig, QwenImageDiT
    from qistudio.ops.rope import ImageGrid, qwen_rotary
    from qistudio.training.config import DataConfig, TrainConfig
    from qistudio.training.optim import make_optimizer

    torch.manual_seed(0)
    config = DiTConfig(num_layers=layers, num_heads=heads, head_dim=128, text_dim=3584)
    dit = QwenImageDiT(config).train()
    dit.gradient_checkpointing = True
    parameters = list(dit.parameters())
    weights = sum(p.numel() * p.element_size() for p in parameters)
    settings = TrainConfig(DataConfig(".", "."), trainable_models="dit", model_paths=("x",), **OPTIONS[option])
    meter = GradientMeter(parameters)
    optimizer = make_optimizer(parameters, settings)  # its state is made at the first step
    base_rss = peak_rss()
    side = int(tokens**0.5)
    rotary = qwen_rotary([ImageGrid(0, side, side)], 16, axes_dim=config.axes_dim)
    for _ in range(3):
        image = torch.randn(1, side * side, config.in_channels)
        text = torch.randn(1, 16, config.text_dim)
        out = dit(image, text, torch.tensor([0.5]), rotary)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    states = 0
    inner = getattr(optimizer, "inner", [optimizer])
    for opt in inner:
        for state in opt.state.values():
            states += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    count = sum(p.numel() for p in parameters)
    return dict(option=option, parameters=count, weights=weights, states=states, grad_peak=meter.peak,
                rss=peak_rss() - base_rss, per_param=(states + meter.peak) / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12, help="width = heads x 128 (Qwen-Image: 24)")
    parser.add_argument("--tokens", type=int, default=64, help="image tokens of the sample (a square grid)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this option, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.heads, args.tokens)))
        return
    rows = []
    for option in OPTIONS:
        child = subprocess.run([sys.executable, __file__, "--one", option, "--layers", str(args.layers), "--heads",
                                str(args.heads), "--tokens", str(args.tokens)], capture_output=True, text=True)
        if child.returncode:
            print(f"{option}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    mib = 2**20
    first = rows[0]
    print(f"DiT: {args.layers} blocks of width {args.heads * 128}, {first['parameters'] / 1e6:.0f} M parameters, "
          f"float32 weights {first['weights'] / mib:.0f} MiB; CPU, 3 steps, per-block checkpointing")
    print("| option | optimizer states MiB | gradient peak MiB | bytes/param beside weights | step RSS MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['option']} | {row['states'] / mib:.1f} | {row['grad_peak'] / mib:.1f} | "
              f"{row['per_param']:.2f} | {row['rss'] / mib:.0f} |")


if __name__ == "__main__":
    main()
