"""GPU benchmark: the whole Qwen-Image pipeline from the quantised files people download (Q4_K_M) in a 12 GiB GPU
budget, run in a fresh process: its peak GPU and host memory, and its time per image and per step (issue 31).

Files (full-size random weights, written once into --work and reused by later runs): the DiT as a Q4_K_M GGUF
(`qistudio quantize`'s writer), the Qwen2.5-VL 7B text encoder as llama.cpp writes it (a Q4_K_M language-model GGUF
plus an F16 mmproj: weights/gguf_text_encoder_write.py), the VAE as bf16 safetensors, the real tokenizer. Each case
then runs in a new Python process (nothing left over from the writing): `QwenImagePipeline.from_pretrained` with
every model resting in host memory (offload_device="cpu") and `vram_limit` (default 12 GiB), a one-step warm-up
image (Triton kernels built, files paged in), then the timed image: text encoding, --steps steps with guidance
(cfg 4, both branches batched), VAE decode, 1328x1328. This process samples the child's host memory
(/proc/PID/status every 20 ms: RssAnon, and VmRSS, which adds the file pages it maps) and the GPU's used memory as
nvidia-smi reports it (every 0.2 s, above what was used before the child started: its CUDA context included); the
child reports torch's peak reserved and allocated memory (across the phases: the memory manager resets the peak
per phase), the plan and each phase's peak.

Budgets: GPU: torch's reserved peak and nvidia-smi's peak <= --vram-limit GiB; host: the anonymous peak <=
--host-limit GB (16, decimal, as RAM is sold). File pages are reported beside it and not counted: the kernel drops
them under pressure and reads them again from the file. (The quantised linears rest as views of their files and
are streamed from there, memory/mapped.py: pinned copies of an 11.5 GiB DiT and a 5.5 GiB text encoder would not fit
16 GB. On a machine that really has 16 GB, the page cache cannot hold every file, so streamed blocks are read from
disk again each step: this run, on a large host, times the page-cache case.)

The command for one H100 (80 GB, 64 GiB disk), about 8 minutes (writing the ~18 GiB of files takes most of it;
they are reused by a later run):

    python bench/quantized_pipeline.py --steps 8

`--bf16` then runs the same with the bf16 files (the DiT as a BF16 GGUF, the text encoder as llama.cpp's BF16
GGUF; ~54 GiB more, the Q4_K_M case's files deleted first when the disk is short; about 6 minutes more).

    python bench/quantized_pipeline.py --smoke    # the plumbing on the CPU: tiny models, vram_limit=0, 2 steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quantized import HostPeak, size_text  # noqa: E402
from bench.report import caption, markdown_table, write_report  # noqa: E402

GiB = 2**30
CASES = {"Q4_K_M": "Q4_K_M files", "BF16": "bf16 files"}
PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"


@dataclass(frozen=True)
class CaseFiles:
    dit: Path
    text_encoder: Path
    mmproj: Path
    vae: Path
    tokenizer: Path

    def all(self) -> list[Path]:
        return [self.dit, self.text_encoder, self.mmproj, self.vae]


def case_files(work: Path, case: str) -> CaseFiles:
    """Where a case's files go: its DiT and text encoder apart, the mmproj (F16 in both), VAE and tokenizer shared."""
    return CaseFiles(work / case / "transformer" / f"dit-{case}.gguf", work / case / f"text-encoder-{case}.gguf",
                     work / "mmproj-F16.gguf", work / "vae" / "diffusion_pytorch_model.safetensors", work / "tokenizer")


# --- writing the files ---------------------------------------------------------------------------------------------


def build(kind: str, smoke: bool):
    """One random model in bf16, built on the device that writes it (the GPU at full size): seeded per kind, so
    every case's files hold the same weights."""
    from qistudio.demo import DEMO_VAE, TEXT_DIM, demo_text_encoder_config
    from qistudio.models.dit import DiTConfig, QwenImageDiT
    from qistudio.models.text_encoder import QwenImageTextEncoder
    from qistudio.models.vae import QwenImageVAE, VAEConfig

    torch.manual_seed({"dit": 0, "text_encoder": 1, "vae": 2}[kind])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: float32 copies of 20B would not fit
    try:
        with torch.device("cpu" if smoke else "cuda"):
            if kind == "dit":  # --smoke: 8 heads of 32, so the block linears take Q4_K's 256-value rows
                config = DiTConfig(num_layers=2, num_heads=8, head_dim=32, text_dim=TEXT_DIM, axes_dim=(8, 12, 12)) \
                    if smoke else DiTConfig()
                return QwenImageDiT(config).eval(), config
            if kind == "text_encoder":
                from bench.pair import released_text_encoder_config

                return QwenImageTextEncoder(demo_text_encoder_config() if smoke else released_text_encoder_config())
            return QwenImageVAE(DEMO_VAE if smoke else VAEConfig())
    finally:
        torch.set_default_dtype(previous)


def write_dit(files: CaseFiles, case: str, smoke: bool) -> None:
    from qistudio.weights.gguf_write import plan_types, write_gguf

    model, config = build("dit", smoke)
    state = model.state_dict()
    shapes, dtypes = {n: tuple(t.shape) for n, t in state.items()}, {n: t.dtype for n, t in state.items()}
    files.dit.parent.mkdir(parents=True, exist_ok=True)
    # Beside the file, as in a diffusers folder: our loader reads the RoPE axes there (the smoke DiT's differ).
    (files.dit.parent / "config.json").write_text(json.dumps({
        "_class_name": "QwenImageTransformer2DModel", "num_layers": config.num_layers,
        "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.text_dim, "axes_dims_rope": list(config.axes_dim)}))
    write_gguf(files.dit, shapes, plan_types(shapes, dtypes, case), state.__getitem__, case)


def write_text_encoder(files: CaseFiles, case: str, smoke: bool) -> None:
    from qistudio.weights.gguf_text_encoder_write import (llama_cpp_preset, write_llama_cpp_mmproj,
                                                          write_llama_cpp_text_model)

    model = build("text_encoder", smoke)
    config, state = model.model.config, model.state_dict()
    files.text_encoder.parent.mkdir(parents=True, exist_ok=True)
    if not files.text_encoder.exists():
        write_llama_cpp_text_model(files.text_encoder, state.items(), config,
                                   llama_cpp_preset(case, config.text_config.num_hidden_layers))
    if not files.mmproj.exists():
        write_llama_cpp_mmproj(files.mmproj, state.items(), config, llama_cpp_preset("F16", 0))


def write_vae(files: CaseFiles, smoke: bool) -> None:
    from safetensors.torch import save_file

    from qistudio.fileio import atomic_path

    state = {name: tensor.cpu().contiguous() for name, tensor in build("vae", smoke).state_dict().items()}
    files.vae.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(files.vae) as temporary:
        save_file(state, str(temporary))


def write_files(files: CaseFiles, case: str, smoke: bool, say) -> None:
    """Each missing file of the case (every file appears only when complete: a killed run leaves none half-written)."""
    from qistudio.tokenizer_build import write_qwen25_tokenizer

    if not (files.tokenizer / "tokenizer_config.json").is_file():
        write_qwen25_tokenizer(files.tokenizer)
    steps = [(files.dit, lambda: write_dit(files, case, smoke)),
             (files.text_encoder, lambda: write_text_encoder(files, case, smoke)),
             (files.mmproj, lambda: write_text_encoder(files, case, smoke)), (files.vae, lambda: write_vae(files, smoke))]
    for path, write in steps:
        if not path.exists():
            write()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        say(f"{path.name}: {size_text(path.stat().st_size)}")


def make_room(work: Path, needed: int, done: list[str], say) -> None:
    """Delete finished cases' DiT and text-encoder files while the disk has less than `needed` bytes free."""
    for case in done:
        if shutil.disk_usage(work).free >= needed:
            return
        for path in (case_files(work, case).dit, case_files(work, case).text_encoder):
            path.unlink(missing_ok=True)
        say(f"deleted the {case} files to make room")


# --- one case, in a fresh process ----------------------------------------------------------------------------------


class PhasePeaks:
    """torch's peak reserved / allocated bytes across the pipeline's phases: the memory manager resets the peak at
    each phase's start, so each phase's is read at its end."""

    def __init__(self, pipe):
        self.reserved = self.allocated = 0
        self.read()
        manager = pipe.components.memory
        original = manager.phase

        @contextmanager
        def phase(name, model_name):
            self.read()  # what the previous phase, or the code between phases, reached
            with original(name, model_name):
                yield
            self.read()

        manager.phase = phase

    def read(self) -> None:
        if torch.cuda.is_available():
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
            self.allocated = max(self.allocated, torch.cuda.max_memory_allocated())


def timed_image(pipe, steps: int, size: int) -> tuple[float, list[float]]:
    """(wall seconds of the whole image, each step's seconds): the device synchronised at every step boundary."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    marks: list[float] = []

    def progress(iterable):
        for item in iterable:
            sync()
            marks.append(time.perf_counter())
            yield item
        sync()
        marks.append(time.perf_counter())

    sync()
    began = time.perf_counter()
    pipe(PROMPT, negative_prompt="blurry, low quality", cfg_scale=4.0, seed=0, num_inference_steps=steps,
         height=size, width=size, progress_bar_cmd=progress)
    sync()
    return time.perf_counter() - began, [b - a for a, b in zip(marks, marks[1:])]


def run_case(args) -> dict:
    """The child: load the case's files under the budget, a warm-up image, the timed image; the figures as JSON."""
    from qistudio import ModelConfig, QwenImagePipeline

    files = case_files(args.work, args.child)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    configs = [ModelConfig(path=str(files.dit), offload_device="cpu"),
               ModelConfig(path=[str(files.text_encoder), str(files.mmproj)], offload_device="cpu"),
               ModelConfig(path=str(files.vae), offload_device="cpu")]
    began = time.perf_counter()
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=configs,
                                             tokenizer_config=ModelConfig(path=str(files.tokenizer)),
                                             vram_limit=args.vram_limit)
    loaded = time.perf_counter() - began
    peaks = PhasePeaks(pipe)
    warm_up, _ = timed_image(pipe, 1, args.size)
    image, steps = timed_image(pipe, args.steps, args.size)
    peaks.read()
    return {"load_s": loaded, "warm_up_s": warm_up, "image_s": image, "step_s": statistics.median(steps),
            "steps_s": steps, "encode_decode_s": image - sum(steps), "plan": pipe.components.memory.plan.describe(),
            "reserved": peaks.reserved, "allocated": peaks.allocated,
            "phases": {name: int(value) for name, value in pipe.memory_report.items()}}


class GpuUsed:
    """Peak of the GPU's used memory (nvidia-smi, MiB -> bytes) above its level when the block starts; None without
    nvidia-smi. The GPU is the first visible one, the one the child uses."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.base = interval, None, None

    @staticmethod
    def _read() -> int | None:
        import os

        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  f"--id={index}"], capture_output=True, text=True, timeout=10)
            return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def __enter__(self):
        self.base = self._read()
        self.running = self.base is not None
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            used = self._read()
            if used is not None:
                self.peak = max(self.peak or 0, used - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def run_child(args, case: str) -> dict:
    """Run one case in a new process, watching its host and GPU memory from here."""
    result = args.work / f"result-{case}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--work", str(args.work), "--steps",
               str(args.steps), "--size", str(args.size), "--vram-limit", str(args.vram_limit), "--result", str(result)]
    with GpuUsed() as gpu:
        process = subprocess.Popen([*command, *(["--smoke"] if args.smoke else [])])
        with HostPeak(pid=process.pid, relative=False) as host:
            code = process.wait()
    if code != 0 or not result.is_file():
        return {"failed": f"the process exited with {code}"}
    return {**json.loads(result.read_text()), "host_anon": host.anon, "host_total": host.total, "gpu_used": gpu.peak}


# --- the report ------------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def row(case: str, args, figures: dict) -> list[str]:
    if "failed" in figures:
        return [CASES[case], figures["failed"], *["-"] * 8]
    limit, host_limit, used = args.vram_limit * GiB, args.host_limit * 1e9, figures.get("gpu_used")
    smi = size_text(used) if used is not None else "-"
    phases = ", ".join(f"{name} {size_text(value)}" for name, value in figures["phases"].items())
    on_gpu = torch.cuda.is_available() and not args.smoke
    gpu_ok = "- (CPU)"
    if on_gpu:  # what the planner budgets (torch's memory), and what a card of that size would see
        gpu_ok = f"torch reserved {verdict(figures['reserved'] <= limit)}" + (
            "" if used is None else f"; nvidia-smi (CUDA context included) {verdict(used <= limit)}")
    gpu_peaks = f"{size_text(figures['reserved'])} / {size_text(figures['allocated'])} / {smi}" if on_gpu else "-"
    return [CASES[case], figures["plan"] + (f"; phase peaks (allocated): {phases}" if phases else ""),
            f"{figures['load_s']:.1f} s", f"{figures['image_s']:.2f} s",
            f"{figures['step_s']:.3f} s ({min(figures['steps_s']):.3f}-{max(figures['steps_s']):.3f})",
            f"{figures['encode_decode_s']:.2f} s",
            gpu_peaks, f"{size_text(figures['host_anon'])} / {size_text(figures['host_total'])}", gpu_ok,
            verdict(figures["host_anon"] <= host_limit)]


def report(args, rows: list[list[str]]) -> None:
    header = ["files", "plan", "load", "image (encode + steps + decode)", "step: median (min-max)",
              "encode + decode", "GPU peak: torch reserved / allocated / nvidia-smi", "host peak: anon / with file "
              "pages", f"GPU budget {args.vram_limit:g} GiB", f"host budget {args.host_limit:g} GB (anon)"]
    size = "smoke run: tiny models on the CPU" if args.smoke else "full size (20B DiT, Qwen2.5-VL 7B)"
    what = (f"The whole Qwen-Image pipeline from files, {size}, random weights, {args.size}x{args.size}, cfg 4 "
            f"(batched), {args.steps} steps, vram_limit={args.vram_limit:g}, every model resting in host memory; "
            "each case in a fresh process after a one-step warm-up image. Q4_K_M files: DiT Q4_K_M GGUF, text "
            "encoder llama.cpp Q4_K_M GGUF + F16 mmproj, VAE bf16 safetensors.")
    method = "one image per case, wall clock with the device synchronised at each step boundary"
    write_report("quantized_pipeline.md", caption(what, method) + "\n\n" + markdown_table(header, rows))


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="denoising steps of the timed image (default 8; 2 with --smoke)")
    parser.add_argument("--size", type=int, help="image side (default 1328; 64 with --smoke)")
    parser.add_argument("--vram-limit", type=float, help="GiB (default 12; 0 with --smoke)")
    parser.add_argument("--host-limit", type=float, default=16.0, help="GB of host RAM the case must fit (anon)")
    parser.add_argument("--bf16", action="store_true", help="also run the bf16 files at the same budget")
    parser.add_argument("--work", type=Path, help="where the files go (default $TMPDIR/qistudio-quantized-pipeline)")
    parser.add_argument("--smoke", action="store_true", help="the plumbing on the CPU: tiny models, 2 steps")
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)  # the fresh process of one case
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 8)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least 1")
    if args.smoke:
        args.work = args.work or Path(tempfile.mkdtemp(prefix="qistudio-quantized-pipeline-smoke-"))
    args.size = args.size or (64 if args.smoke else 1328)
    args.vram_limit = args.vram_limit if args.vram_limit is not None else (0.0 if args.smoke else 12.0)
    args.work = args.work or Path(tempfile.gettempdir()) / "qistudio-quantized-pipeline"
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        args.result.write_text(json.dumps(run_case(args)))
        return
    start = time.monotonic()

    def say(what: str) -> None:
        print(f"[{time.monotonic() - start:.0f} s] {what}", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    cases = ["Q4_K_M", *(["BF16"] if args.bf16 else [])]
    rows, done = [], []
    for case in cases:
        files = case_files(args.work, case)
        if case == "BF16" and not args.smoke:
            make_room(args.work, 60 * GiB, done, say)  # 20.4B + 8.3B parameters in bf16, and some to spare
        write_files(files, case, args.smoke, say)
        say(f"{case}: files ready; running the pipeline in a new process")
        figures = run_child(args, case)
        say(f"{case}: {json.dumps({k: v for k, v in figures.items() if k != 'steps_s'})}")
        rows.append(row(case, args, figures))
        done.append(case)
        report(args, rows)


if __name__ == "__main__":
    main()
