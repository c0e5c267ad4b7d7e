"""GPU benchmark: a whole image (text encoding + N steps with guidance + VAE decode) through qistudio's pipeline and
diffusers' QwenImagePipeline, one process, one card, the same full-size random weights shared by both.

Both DiTs run regional torch.compile of their repeated block (diffusers' best configuration). Ours batches the two
guidance branches; diffusers' pipeline runs them one after the other. Also ours with FP8 (W8A8) block linears.
Needs bench/.tokenizer and bench/.shapes (see bench/pipeline_low_vram.py).

    python bench/end_to_end.py [--steps 40] [--size 1328]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_low_vram import PROMPT  # noqa: E402
from qistudio.ops.packing import patchify  # noqa: E402

NEGATIVE = "blurry, low quality"


def wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def build_both():
    """diffusers' components built on the GPU in bf16; ours take the same tensors (no second copy)."""
    import json

    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from qistudio.components import Components
    from qistudio.demo import SCHEDULER
    from qistudio.models.dit import DiTConfig, QwenImageDiT
    from qistudio.models.text_encoder import QwenImageTextEncoder, text_encoder_config_from_shapes
    from qistudio.models.vae import QwenImageVAE, VAEConfig
    from qistudio.pipeline import QwenImagePipeline as OurPipeline
    from qistudio.weights.build import empty_parameters
    from qistudio.weights.formats import detect_layout

    root = Path(__file__).resolve().parents[1]
    listing = json.loads((root / "bench/.shapes/qwen_image_text_encoder.json").read_text())["tensors"]
    layout = detect_layout(listing)
    config = text_encoder_config_from_shapes({layout.key_map(k): tuple(v) for k, v in listing.items()})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = QwenImageTransformer2DModel(num_layers=60).eval().requires_grad_(False)
        vae = AutoencoderKLQwenImage().eval().requires_grad_(False)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "bench/.tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    ref = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            transformer=transformer)
    ref.set_progress_bar_config(disable=True)
    with empty_parameters():
        dit = QwenImageDiT(DiTConfig())
        our_vae = QwenImageVAE(VAEConfig())
    dit.load_state_dict(transformer.state_dict(), assign=True, strict=True)
    missing = our_vae.load_state_dict(vae.state_dict(), assign=True, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    our_vae.to("cuda")
    with torch.device("meta"):
        our_text = QwenImageTextEncoder(config)
    our_text.model = text_encoder.model  # the same module: one copy of the 8 B parameters
    components = Components(dit=dit.eval().requires_grad_(False), vae=our_vae.eval(), text_encoder=our_text.eval(),
                            tokenizer=tokenizer)
    return OurPipeline(components, "cuda", torch.bfloat16), ref


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=1328)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    ours, ref = build_both()
    ref.transformer.compile_repeated_blocks(fullgraph=True)
    for block in ours.dit.transformer_blocks:
        block.compile(fullgraph=True)
    size, steps = args.size, args.steps
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def run_ours(n):
        return ours(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, num_inference_steps=n, height=size, width=size,
                    noise=noise, progress_bar_cmd=lambda x: x)

    def run_ref(n):
        with torch.no_grad():
            return ref(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=n,
                       height=size, width=size, latents=patchify(noise.cuda()))

    rows = []
    for name, fn in [("diffusers QwenImagePipeline, compiled transformer", run_ref),
                     ("qistudio, compiled DiT blocks, guidance batched", run_ours)]:
        fn(2)  # compile and warm up
        rows.append((name, wall(lambda: fn(steps))))
        print(rows[-1], flush=True)
    from qistudio.memory.fp8_linear import quantize_linears, set_fp8_compute

    quantize_linears(ours.dit)
    set_fp8_compute(ours.dit, True)
    torch.cuda.empty_cache()
    run_ours(2)
    rows.append(("qistudio, compiled, FP8 W8A8 block linears", wall(lambda: run_ours(steps))))
    print(rows[-1], flush=True)
    base = rows[0][1]
    lines = [f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
             f"{size}x{size}, {steps} steps, cfg 4 with a negative prompt, text encoding + steps + VAE decode, "
             "full-size random weights shared by both libraries", "",
             "| pipeline | image | x diffusers |", "|---|---|---|"]
    lines += [f"| {name} | {t:.2f} s | {t / base:.2f} |" for name, t in rows]
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "end_to_end.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
