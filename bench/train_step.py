"""GPU benchmark: one LoRA training step of the full-size Qwen-Image DiT, qistudio against DiffSynth-Studio 2.1.12.

One process, one card. Random weights in the real shapes (tests/data/checkpoints listing; DiTConfig's
defaults, the same numbers, where that is absent), a 1024x1024 target (4096 image tokens), 64 random text states
(the text encoder and VAE are not part of a step when their outputs are cached), LoRA rank 32 on the 12 standard
targets, batch 1, AdamW over the LoRA, gradient checkpointing on and off. Modes:
  ours            qistudio, resident bf16 base, LoRA in float32 (training/adapters.py), eager
  ours-compile    the same with each DiT block under torch.compile (regional)
  lowmem          qistudio --fp8_base --vram_limit (default 16 GiB): FP8 base, frozen blocks streamed (checkpointing)
  lowmem-compile  the same with compiled blocks
  diffsynth       DiffSynth-Studio's QwenImageDiT, peft LoRA cast to bf16 as its trainer does, its model function and
                  its gradient checkpointing (eager, as it trains)
  diffsynth-compile  the same with each of its blocks under torch.compile from outside (nn.Module.compile of the
                  block, as our regional compile; its trainer has no such switch)
Each row: seconds per step (wall clock between synchronisations; median and min-max of --steps after --warmup
untimed steps; the modes cannot be interleaved, each is its own model in memory), peak device memory (allocated
and reserved, over warm-up and steps, weights included). Ratios are speed-ups (the other's time over this row's). A mode that fails (out of memory) is reported in
its row; the others go on. Appends a dated section to bench/RESULTS.md (atomically) on a GPU, and writes it to
$OUT/train_step.md when OUT is set.

    python bench/train_step.py [--modes ours ours-compile lowmem diffsynth] [--checkpointing on off]
    python bench/train_step.py --quick --device cpu --blocks 2 --size 64     # logic check without a GPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import caption, markdown_table, write_report  # noqa: E402
from bench.timing import Timing  # noqa: E402
from qistudio.memory.plan import GiB  # noqa: E402
from qistudio.models.dit import DiTConfig, QwenImageDiT, dit_config_from_shapes  # noqa: E402
from qistudio.ops.packing import patchify  # noqa: E402
from qistudio.ops.rope import ImageGrid, qwen_rotary  # noqa: E402
from qistudio.training.adapters import add_lora  # noqa: E402
from qistudio.training.config import DEFAULT_LORA_TARGETS, DataConfig, TrainConfig  # noqa: E402
from qistudio.training.lowmem import prepare_dit  # noqa: E402
from qistudio.training.outputs import write_text_atomic  # noqa: E402

LISTING = ROOT / "tests" / "data" / "checkpoints" / "qwen_image_transformer.json"
MODES = ("ours", "ours-compile", "lowmem", "lowmem-compile", "diffsynth", "diffsynth-compile")


# --- models ----------------------------------------------------------------------------------------------------------


def dit_config(blocks: int) -> tuple[DiTConfig, str]:
    if LISTING.is_file():
        shapes = {k: tuple(v) for k, v in json.loads(LISTING.read_text())["tensors"].items()}
        cfg, source = dit_config_from_shapes(shapes), "checkpoint listing"
    else:
        cfg, source = DiTConfig(), "DiTConfig defaults"
    return DiTConfig(**{**cfg.__dict__, "num_layers": blocks}), source


def on_device(build, device):
    """Build a module directly on `device` in bfloat16 (random init there: fast on a GPU, no float32 copy)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def build_ours(cfg: DiTConfig, device, rank: int) -> QwenImageDiT:
    dit = on_device(lambda: QwenImageDiT(cfg), device).requires_grad_(False)
    config = TrainConfig(DataConfig("-", "-"), model_paths=("-",), lora_base_model="dit", lora_rank=rank)
    add_lora(dit, config)  # the trainer's own injection: LoRA factors in float32
    return dit.train()


def import_diffsynth():
    """diffsynth's DiT and model function, imported with its hub client (modelscope) stubbed: no network here."""
    def module(name, **attributes):
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stub.__dict__.update(attributes)
        return stub

    def no_hub(*args, **kwargs):
        raise RuntimeError("the modelscope hub client is stubbed in this benchmark")

    stubs = {"modelscope": module("modelscope", snapshot_download=no_hub)}
    for name in ("imageio", "pandas"):  # its data-set readers, not needed for a step
        if importlib.util.find_spec(name) is None:
            stubs[name] = module(name)
    if "imageio" in stubs:
        stubs["imageio.v3"] = stubs["imageio"].v3 = module("imageio.v3")
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        from diffsynth.models.qwen_image_dit import QwenImageDiT as DiffSynthDiT
        from diffsynth.pipelines.qwen_image import model_fn_qwen_image
    finally:
        for key, value in saved.items():
            sys.modules.pop(key) if value is None else sys.modules.__setitem__(key, value)
    return DiffSynthDiT, model_fn_qwen_image


def build_diffsynth(blocks: int, device, rank: int):
    from peft import LoraConfig, inject_adapter_in_model

    DiffSynthDiT, model_fn = import_diffsynth()
    dit = on_device(lambda: DiffSynthDiT(num_layers=blocks), device).requires_grad_(False)
    # DiffusionTrainingModule.add_lora_to_model: peft with alpha = rank, then the trainable tensors in the pipeline's
    # dtype (bf16).
    dit = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_LORA_TARGETS)), dit)
    for param in dit.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return dit.train(), model_fn


# --- steps -----------------------------------------------------------------------------------------------------------


class Inputs:
    """One cached sample: latents of the target, text states, noise; the same for every mode."""

    def __init__(self, size: int, text_len: int, text_dim: int, device):
        g = torch.Generator(device).manual_seed(0)
        self.size, self.text_len = size, text_len
        self.latents = torch.randn(1, 16, size // 8, size // 8, generator=g, device=device, dtype=torch.bfloat16)
        self.noise = torch.randn(self.latents.shape, generator=g, device=device, dtype=torch.bfloat16)
        self.text = torch.randn(1, text_len, text_dim, generator=g, device=device, dtype=torch.bfloat16)
        self.sigma = 0.7
        self.noisy = ((1 - self.sigma) * self.latents.float() + self.sigma * self.noise.float()).to(torch.bfloat16)
        self.target = self.noise.float() - self.latents.float()

    @property
    def image_tokens(self) -> int:
        return (self.size // 16) ** 2


def ours_loss(dit: QwenImageDiT, inputs: Inputs):
    grid = inputs.size // 16
    rotary = qwen_rotary([ImageGrid(0, grid, grid)], inputs.text_len, device=inputs.latents.device)
    timestep = torch.full((1,), inputs.sigma, device=inputs.latents.device)

    def loss():
        prediction = dit(patchify(inputs.noisy), inputs.text, timestep, rotary, [inputs.text_len])
        return F.mse_loss(prediction.float(), patchify(inputs.target))

    return loss


def diffsynth_loss(dit, model_fn, inputs: Inputs, checkpointing: bool):
    device = inputs.latents.device
    timestep = torch.tensor([inputs.sigma * 1000], dtype=torch.bfloat16, device=device)  # its timesteps are 0..1000
    mask = torch.ones(1, inputs.text_len, dtype=torch.long, device=device)

    def loss():
        prediction = model_fn(dit=dit, latents=inputs.noisy, timestep=timestep, prompt_emb=inputs.text,
                              prompt_emb_mask=mask, height=inputs.size, width=inputs.size,
                              use_gradient_checkpointing=checkpointing)
        return F.mse_loss(prediction.float(), inputs.target)

    return loss


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_training(dit, loss_fn, device, warmup: int, steps: int) -> dict:
    """Median seconds per step (forward, backward, AdamW step) and the peak memory, in GiB."""
    parameters = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for i in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    timing = Timing(tuple(times))
    result = {"step": timing.median, "timing": timing, "lora_params": sum(p.numel() for p in parameters)}
    if cuda:
        result["allocated"] = torch.cuda.max_memory_allocated() / GiB
        result["reserved"] = torch.cuda.max_memory_reserved() / GiB
    return result


def compile_blocks(blocks, enabled: bool) -> None:
    """Regional compile: each block's call (hooks included; the streamer's are kept out of the graph)."""
    for block in blocks:
        if enabled:
            block.compile()
        else:
            block._compiled_call_impl = None  # back to eager


def h2d_bandwidth() -> float:
    """GB/s of a 1 GiB pinned host-to-device copy: what bounds the streamed modes."""
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * GiB / (time.perf_counter() - start) / 1e9


def cleanup(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --- the run ---------------------------------------------------------------------------------------------------------


def run_case(rows: list, mode: str, checkpointing: bool, measure, note: str = "") -> None:
    """One row; an exception (out of memory) becomes the row's note and the run goes on."""
    label = "on" if checkpointing else "off"
    try:
        result = measure()
    except Exception as e:  # noqa: BLE001 - each mode is guarded, the table says what failed
        message = " ".join(str(e).split())[:160]
        rows.append(dict(mode=mode, checkpointing=label, error=f"{type(e).__name__}: {message}"))
    else:
        rows.append(dict(mode=mode, checkpointing=label, note=note, **result))
    print(rows[-1], flush=True)


def run_ours(args, cfg, inputs, rows) -> None:
    wanted = [m for m in args.modes if m.startswith(("ours", "lowmem"))]
    if not wanted:
        return
    dit = build_ours(cfg, args.device, args.rank)
    loss = ours_loss(dit, inputs)
    for mode in ("ours", "ours-compile"):
        if mode not in args.modes:
            continue
        compile_blocks(dit.transformer_blocks, mode.endswith("compile"))
        for checkpointing in args.checkpointing:
            dit.gradient_checkpointing = checkpointing
            dit.checkpointed_blocks = args.checkpointed_blocks
            run_case(rows, mode, checkpointing, lambda: time_training(dit, loss, args.device, args.warmup, args.steps))
            cleanup(args.device)
    dit.checkpointed_blocks = None
    if not any(m.startswith("lowmem") for m in args.modes):
        return
    compile_blocks(dit.transformer_blocks, False)
    dit.gradient_checkpointing = True  # streaming needs it
    try:
        low = prepare_dit(dit, args.device, fp8=True, vram_limit=args.vram_limit, image_tokens=inputs.image_tokens)
    except Exception as e:  # noqa: BLE001
        for mode in ("lowmem", "lowmem-compile"):
            rows.append(dict(mode=mode, checkpointing="on", error=f"setup: {type(e).__name__}: {e}"))
        return
    cleanup(args.device)
    note = low.describe()
    for mode in ("lowmem", "lowmem-compile"):
        if mode not in args.modes:
            continue
        compile_blocks(dit.transformer_blocks, mode.endswith("compile"))
        for checkpointing in args.checkpointing:
            if not checkpointing:
                rows.append(dict(mode=mode, checkpointing="off", skipped="streaming needs gradient checkpointing"))
                continue
            copies = low.streamer.copies if low.streamer else 0
            run_case(rows, mode, True, lambda: time_training(dit, loss, args.device, args.warmup, args.steps), note)
            if low.streamer and "error" not in rows[-1]:
                per_step = (low.streamer.copies - copies) / (args.warmup + args.steps)
                rows[-1]["note"] += f"; {per_step:.0f} block copies per step"
            cleanup(args.device)
    if low.streamer is not None:
        low.streamer.detach()


def run_diffsynth(args, inputs, rows) -> None:
    wanted = [m for m in ("diffsynth", "diffsynth-compile") if m in args.modes]
    if not wanted:
        return
    try:
        dit, model_fn = build_diffsynth(args.blocks, args.device, args.rank)
    except Exception as e:  # noqa: BLE001
        rows.append(dict(mode="diffsynth", checkpointing="-", error=f"setup: {type(e).__name__}: {e}"))
        return
    for mode in wanted:
        compile_blocks(dit.transformer_blocks, mode.endswith("compile"))
        for checkpointing in args.checkpointing:
            loss = diffsynth_loss(dit, model_fn, inputs, checkpointing)
            run_case(rows, mode, checkpointing,
                     lambda: time_training(dit, loss, args.device, args.warmup, args.steps))
            cleanup(args.device)


def table(rows: list, args, header: str) -> str:
    def reference(mode, checkpointing):
        return next((r["step"] for r in rows if r["mode"] == mode and r["checkpointing"] == checkpointing
                     and "step" in r), None)

    def compiled(mode):
        return mode.endswith("compile")

    header_row = ["mode", "grad ckpt", "s/step: median (min-max, n)", "speed-up vs DiffSynth eager",
                  "speed-up vs DiffSynth, same compile", "x ours resident (time; same ckpt and compile)",
                  "peak alloc GiB", "peak reserved GiB", "LoRA params", "notes"]
    lines = []
    for r in rows:
        if "error" in r or "skipped" in r:
            outcome, why = ("failed", r["error"]) if "error" in r else ("n/a", r["skipped"])
            lines.append([r["mode"], r["checkpointing"], outcome, "", "", "", "", "", "", why])
            continue
        eager_base = reference("diffsynth", r["checkpointing"])
        same_base = reference("diffsynth-compile" if compiled(r["mode"]) else "diffsynth", r["checkpointing"])
        resident = (reference("ours-compile" if compiled(r["mode"]) else "ours", r["checkpointing"])
                    if not r["mode"].startswith("diffsynth") else None)
        lines.append([r["mode"], r["checkpointing"], r["timing"].text(),
                      f"{eager_base / r['step']:.2f}" if eager_base else "",
                      f"{same_base / r['step']:.2f}" if same_base else "",
                      f"{r['step'] / resident:.2f}" if resident else "",
                      f"{r['allocated']:.1f}" if "allocated" in r else "",
                      f"{r['reserved']:.1f}" if "reserved" in r else "",
                      f"{r['lora_params'] / 1e6:.1f} M", r.get("note", "")])
    return header + "\n\n" + markdown_table(header_row, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    parser.add_argument("--text_len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--vram_limit", type=float, default=16.0, help="lowmem modes' budget in GiB")
    parser.add_argument("--checkpointed_blocks", type=int, help="ours modes, checkpointing on: checkpoint only the "
                        "first N blocks (the trainer's --checkpointed_blocks; default: all)")
    parser.add_argument("--blocks", type=int, help="DiT blocks (default 60; 4 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few blocks and steps, no RESULTS.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--tf32", action="store_true", help="float32 matmuls (our LoRA factors') on TF32 tensor cores")
    args = parser.parse_args()
    args.checkpointing = [c == "on" for c in args.checkpointing]
    args.blocks = args.blocks or (4 if args.quick else 60)
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64

    cfg, source = dit_config(args.blocks)
    inputs = Inputs(args.size, args.text_len, cfg.text_dim, args.device)
    rows: list[dict] = []
    started = time.time()
    run_ours(args, cfg, inputs, rows)
    cleanup(args.device)
    run_diffsynth(args, inputs, rows)

    cuda = torch.device(args.device).type == "cuda"
    link = f"host to device {h2d_bandwidth():.0f} GB/s pinned" if cuda else None
    what = (f"## LoRA training step (`bench/train_step.py`), {time.strftime('%Y-%m-%d')}\n\n"
            f"DiT: {args.blocks} blocks ({source}), random bf16 weights; {args.size}x{args.size} "
            f"({inputs.image_tokens} image tokens), {args.text_len} text tokens, batch 1, LoRA rank {args.rank} on "
            f"the 12 standard targets, AdamW; lowmem budget {args.vram_limit:g} GiB; float32 matmuls "
            f"{'TF32' if args.tf32 else 'full precision (default)'}. Run took {time.time() - started:.0f} s.")
    method = (f"each mode in turn (each is its own model in memory), {args.steps} steps after {args.warmup} untimed, "
              "wall clock between synchronisations; median (min-max, n)")
    text = table(rows, args, caption(what, method, link))
    write_report("train_step.md", text)
    if cuda and not args.quick and not args.no_results:
        results = ROOT / "bench" / "RESULTS.md"
        write_text_atomic(results, results.read_text().rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
