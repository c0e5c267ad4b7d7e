"""GPU check: which bf16 DiT paths stay closest to float32. The DiT (random weights, 1328x1328, batch 2) runs in
float32 as the truth, then in bf16: diffusers eager and compiled, ours eager and compiled, with the fused
adaptive-norm kernels and with their reference forms. Prints each one's relative L2 error against float32.

    python bench/fused_norm_check.py [--layers 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import TEXT_LEN  # noqa: E402
from qistudio.compile import compile_repeated_blocks  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.ops import ada_norm  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402
from qistudio.weights.build import empty_parameters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=20, help="blocks (float32 weights must fit the card)")
    args = parser.parse_args()
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = QwenImageTransformer2DModel(num_layers=args.layers).eval().requires_grad_(False)  # float32
    with empty_parameters():
        ours = QwenImageDiT(DiTConfig(num_layers=args.layers))
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)
    ours.eval().requires_grad_(False)
    h = w = 1328 // 16
    tokens = torch.randn(2, h * w, 64, device="cuda")
    text = torch.randn(2, TEXT_LEN, 3584, device="cuda")
    sigma = torch.full((2,), 0.5, device="cuda")
    rotary = qwen_rotary([ImageGrid(0, h, w)], TEXT_LEN, device="cuda")

    def run_ref():
        return ref(hidden_states=tokens, encoder_hidden_states=text, timestep=sigma,
                   img_shapes=[[(1, h, w)]] * 2, return_dict=False)[0].float()

    outputs = {}
    with torch.no_grad():
        truth = ours(tokens, text, sigma, rotary).float()
        outputs["diffusers float32"] = run_ref()
        ref.to(torch.bfloat16)
        ours.load_state_dict(ref.state_dict(), assign=True, strict=True)  # the same bf16 weights
        tokens, text = tokens.bfloat16(), text.bfloat16()
        outputs["diffusers bf16 eager"] = run_ref()
        for compiled in (False, True):
            if compiled:
                compile_repeated_blocks(ours)
            for fused in (False, True):
                ada_norm.set_fused_ada_norm(fused)
                name = f"qistudio bf16 {'compiled' if compiled else 'eager'}, {'fused' if fused else 'reference'} norms"
                outputs[name] = ours(tokens, text, sigma, rotary).float()
        ref.compile_repeated_blocks(fullgraph=True)
        outputs["diffusers bf16 compiled"] = run_ref()
    for name, out in outputs.items():
        print(f"{name}: rel. err vs float32 {((out - truth).norm() / truth.norm()).item():.2e}")


if __name__ == "__main__":
    main()
