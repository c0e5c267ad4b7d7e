"""GPU benchmark: the whole pipeline (text encoder, DiT, VAE; full size, random weights) at vram_limit=0 against
the same pipeline fully resident, on one card: per-phase peak memory, time, and equality of the final latents.

The tokenizer (the real Qwen2.5 one, built offline) and the text encoder's tensor listing travel with the tree:
    python -c "from qistudio.tokenizer_build import write_qwen25_tokenizer; write_qwen25_tokenizer('bench/.tokenizer')"
    cp ../shared/reference/checkpoints/qwen_image_text_encoder.json bench/.shapes/
    python bench/pipeline_low_vram.py [--steps 4] [--size 1328]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qistudio.components import Components  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.models.text_encoder import QwenImageTextEncoder, text_encoder_config_from_shapes  # noqa: E402
from qistudio.models.vae import QwenImageVAE, VAEConfig  # noqa: E402
from qistudio.pipeline import QwenImagePipeline  # noqa: E402
from qistudio.weights.formats import TEXT_ENCODER, detect_layout  # noqa: E402

GiB = 2**30
PROMPT = "A watercolour fox in a snowy birch forest at dawn, soft light, fine detail"


def build_pipeline() -> QwenImagePipeline:
    from transformers import AutoTokenizer

    listing = json.loads((ROOT / "bench/.shapes/qwen_image_text_encoder.json").read_text())["tensors"]
    layout = detect_layout(listing)
    assert layout.kind == TEXT_ENCODER
    shapes = {layout.key_map(k): tuple(v) for k, v in listing.items()}  # (lm_head maps to IGNORED: unused)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: float32 copies would not fit
    with torch.device("cuda"):
        text_encoder = QwenImageTextEncoder(text_encoder_config_from_shapes(shapes))
        dit = QwenImageDiT(DiTConfig())
        vae = QwenImageVAE(VAEConfig())
    torch.set_default_dtype(torch.float32)
    for model in (text_encoder, dit, vae):
        model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "bench/.tokenizer"))
    components = Components(dit=dit, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    return QwenImagePipeline(components, "cuda", torch.bfloat16)


def timed(pipe, steps: int, size: int):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    latents = pipe(PROMPT, negative_prompt="blurry", cfg_scale=4.0, seed=0, num_inference_steps=steps, height=size,
                   width=size, output_type="latent", progress_bar_cmd=lambda x: x)
    from qistudio.pipeline import decode  # decoded here (not by pipe()) so the latents come back too

    with torch.no_grad():
        decode(pipe.components, pipe.last_request, latents)
    if pipe.components.memory is not None:
        pipe.components.memory.release()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / GiB, latents.float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=1328)
    args = parser.parse_args()
    t0 = time.time()
    pipe = build_pipeline()
    print(f"built in {time.time() - t0:.0f}s", flush=True)
    rows = []
    timed(pipe, 1, args.size)  # warm-up
    t_res, peak_res, lat_res = timed(pipe, args.steps, args.size)
    rows.append(("resident", t_res, peak_res, "", 0.0))
    print(rows[-1], flush=True)
    plan = pipe.enable_vram_management(vram_limit=0)
    torch.cuda.empty_cache()
    timed(pipe, 1, args.size)  # warm-up (pinned buffers, first streams)
    pipe.components.memory.report.clear()
    t_low, peak_low, lat_low = timed(pipe, args.steps, args.size)
    phases = ", ".join(f"{k} {v / GiB:.2f}" for k, v in pipe.memory_report.items())
    err = ((lat_low - lat_res).norm() / lat_res.norm()).item()
    rows.append(("vram_limit=0", t_low, peak_low, f"{plan.describe()}; phase peaks GiB: {phases}", err))
    print(rows[-1], flush=True)
    lines = [
        f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}; "
        f"whole pipeline {args.size}x{args.size}, cfg 4 (batched), {args.steps} steps, bf16, random full-size weights",
        "",
        "| case | time (encode + steps + decode) | peak GiB | plan | rel. err of latents vs resident |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {t:.2f} s | {peak:.2f} | {note} | {err:.1e} |" for name, t, peak, note, err in rows]
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out, "pipeline_low_vram.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
