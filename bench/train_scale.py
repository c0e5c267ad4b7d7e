"""GPU benchmark: the full fine-tune of the 20B DiT on several GPUs, qistudio's FSDP2 and DeepSpeed ZeRO-3 against
DiffSynth-Studio 2.1.12's train.py under the seed's ZeRO-3 config, on the same machine.

    python bench/train_scale.py prepare /data/scale        # random full-size weights in the released layout + data
    python bench/train_scale.py run /data/scale --gpus 4 --diffsynth-train DiffSynth-Studio/examples/qwen_image/model_training/train.py
    python bench/train_scale.py run /data/scale --gpus 2 --cases fsdp2     # for the 2 -> 4 scaling
    python bench/train_scale.py plumbing                   # CPU, 2 gloo processes, the demo model: the code paths only

`prepare` writes random bf16 weights (normal, std 0.02) under the released checkpoints' names and shapes
(tests/data/checkpoints: the 20.4B DiT in 9 shards, the 8.3B text encoder, the VAE; 57 GB), their config files,
the Qwen2.5 tokenizer (built offline) and 16 random 1024x1024 images with prompts. `run` trains each case for
--steps optimizer steps, one 1024x1024 sample per GPU per step (batch 1 per GPU, gradient checkpointing, AdamW,
prompts encoded at every step as both trainers do by default), each case a fresh `accelerate launch` of its own:
  fsdp2      qistudio train, examples/model_training/full/accelerate_config_fsdp2.yaml
  zero3      qistudio train --initialize_model_on_cpu, examples/model_training/full/accelerate_config_zero3.yaml
  diffsynth  DiffSynth-Studio's train.py (give its path) with the same ZeRO-3 config and its own arguments
Per case: seconds per step (median over the steps after --warmup, min-max beside it; ours from the loss.csv
timestamps, DiffSynth's from its progress bar's elapsed time), images per second (GPUs / step time), and the peak
memory of each GPU as nvidia-smi sees it (sampled every 0.5 s: everything the process holds, CUDA context and the
allocator's reserve included, so both trainers are counted alike). A case that fails (out of memory) says so in
its row. The table goes to stdout and $OUT/train_scale.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import caption, markdown_table, write_report  # noqa: E402

LISTINGS = ROOT / "tests" / "data" / "checkpoints"
CONFIGS = ROOT / "examples" / "model_training" / "full"
CASES = ("fsdp2", "zero3", "diffsynth")
DIT_CONFIG = dict(_class_name="QwenImageTransformer2DModel", patch_size=2, in_channels=64, out_channels=16,
                  num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                  guidance_embeds=False, axes_dims_rope=[16, 56, 56])
SHARD_BYTES = 5 * 2**30


# --- prepare ---------------------------------------------------------------------------------------------------------
def write_random_checkpoint(listing: str, folder: Path, stem: str, seed: int) -> None:
    """Random bf16 tensors under a released checkpoint's names and shapes, sharded with an index file."""
    import torch
    from safetensors.torch import save_file

    tensors = json.loads((LISTINGS / f"{listing}.json").read_text())["tensors"]
    shards, current, size = [], {}, 0
    for name, shape in tensors.items():
        current[name] = shape
        size += 2 * max(1, int(torch.tensor(shape).prod())) if shape else 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards, start=1):
        name = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else f"{stem}.safetensors"
        out = {key: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for key, shape in shard.items()}
        save_file(out, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        print(f"  {folder.name}/{name}", flush=True)
    if len(shards) > 1:
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))


def prepare(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    from qistudio.models.text_encoder import text_encoder_config_from_shapes
    from qistudio.weights.formats import detect_layout
    from qistudio.tokenizer_build import write_qwen25_tokenizer

    write_random_checkpoint("qwen_image_transformer", folder / "transformer", "diffusion_pytorch_model", 1)
    (folder / "transformer" / "config.json").write_text(json.dumps(DIT_CONFIG, indent=1))
    write_random_checkpoint("qwen_image_text_encoder", folder / "text_encoder", "model", 2)
    listed = json.loads((LISTINGS / "qwen_image_text_encoder.json").read_text())["tensors"]
    layout = detect_layout(listed.keys(), "the text encoder listing")
    shapes = {layout.key_map(k): tuple(v) for k, v in listed.items()}  # in our names, as the loader reads them
    text_encoder_config_from_shapes(shapes).to_json_file(str(folder / "text_encoder" / "config.json"))
    write_random_checkpoint("qwen_image_vae", folder / "vae", "diffusion_pytorch_model", 3)
    (folder / "vae" / "config.json").write_text(json.dumps(_diffusers_vae_defaults(), indent=1))
    write_qwen25_tokenizer(folder / "tokenizer")
    data = folder / "data"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(16):
        Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(data / f"{k:02d}.png")
        rows.append({"image": f"{k:02d}.png", "prompt": f"random picture number {k}, noise in many colours"})
    with open(data / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)


def _diffusers_vae_defaults() -> dict:
    """diffusers' AutoencoderKLQwenImage defaults: the released VAE's config."""
    import inspect

    from diffusers import AutoencoderKLQwenImage

    defaults = {k: v.default for k, v in inspect.signature(AutoencoderKLQwenImage.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    return {"_class_name": "AutoencoderKLQwenImage", **defaults}


# --- run -------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_config(name: str, processes: int, cpu: bool, folder: Path) -> Path:
    import yaml

    settings = yaml.safe_load((CONFIGS / name).read_text())
    settings.update(num_processes=processes, main_process_port=free_port(), use_cpu=cpu)
    if cpu:
        settings["mixed_precision"] = "no"
    path = folder / name
    path.write_text(yaml.safe_dump(settings))
    return path


def model_paths(repo: Path) -> list:
    return [sorted(str(p) for p in (repo / "transformer").glob("*.safetensors")),
            sorted(str(p) for p in (repo / "text_encoder").glob("*.safetensors")),
            str(repo / "vae" / "diffusion_pytorch_model.safetensors")]


def case_command(case: str, repo: Path, out: Path, args, config: Path) -> list[str]:
    data = repo / "data"
    common = ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
              "--model_paths", json.dumps(model_paths(repo)), "--tokenizer_path", str(repo / "tokenizer"),
              "--trainable_models", "dit", "--learning_rate", "1e-5", "--use_gradient_checkpointing",
              "--remove_prefix_in_ckpt", "pipe.dit.", "--output_path", str(out)]
    size = ["--height", str(args.size), "--width", str(args.size)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    # enough samples for --steps optimizer steps over all processes
    repeat = str(-(-args.steps * args.gpus // 16))
    if case == "diffsynth":
        return launch + [str(args.diffsynth_train), *common, *size, "--dataset_repeat", repeat,
                         "--initialize_model_on_cpu", "--num_epochs", "1", "--dataset_num_workers", "2"]
    ours = launch + ["--module", "qistudio.cli.main", "train", *common, *size, "--dataset_repeat", repeat,
                     "--max_steps", str(args.steps), "--save_steps", str(10**9), "--enable_csv_log",
                     "--optimizer", args.optimizer]
    return ours + (["--initialize_model_on_cpu"] if case == "zero3" else [])


class MemorySampler:
    """The most memory each GPU used while the block ran (nvidia-smi, every 0.5 s)."""

    def __enter__(self):
        self.peak: dict[int, float] = {}
        try:
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,"
                                             "nounits", "--loop-ms=500"], stdout=subprocess.PIPE, text=True,
                                            stderr=subprocess.DEVNULL)
        except OSError:
            self.process = None
        return self

    def __exit__(self, *exc):
        if self.process is None:
            return
        self.process.terminate()
        for line in self.process.communicate()[0].splitlines():
            parts = line.split(",")
            if len(parts) == 2 and all(p.strip().replace(".", "").isdigit() for p in parts):
                gpu, used = int(parts[0]), float(parts[1])
                self.peak[gpu] = max(self.peak.get(gpu, 0.0), used)


def our_step_times(out: Path, warmup: int) -> list[float]:
    rows = list(csv.DictReader(open(out / "loss.csv")))
    stamps = [float(r["time"]) for r in rows]
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def progress_step_times(output: str, warmup: int) -> list[float]:
    """Seconds per step from a tqdm bar's refreshes ('n/N [MM:SS<...'): elapsed between consecutive counts."""
    seen: dict[int, float] = {}
    for n, minutes, seconds in re.findall(r"(\d+)/\d+ \[(\d+):(\d\d)<", output):
        seen.setdefault(int(n), int(minutes) * 60 + int(seconds))
    counts = sorted(seen)
    if len(counts) < warmup + 2:
        return []
    first, last = counts[warmup], counts[-1]
    return [(seen[last] - seen[first]) / (last - first)]


def run_case(case: str, repo: Path, args, work: Path) -> list[str]:
    config_name = {"fsdp2": "accelerate_config_fsdp2.yaml"}.get(case, "accelerate_config_zero3.yaml")
    config = accelerate_config(config_name, args.gpus, args.cpu, work)
    out = work / case
    command = case_command(case, repo, out, args, config)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with MemorySampler() as memory:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    (work / f"{case}.log").write_text(output)
    if done.returncode != 0:
        reason = "out of memory" if "out of memory" in output.lower() else f"failed (status {done.returncode})"
        return [case, reason, "", "", "", f"{wall:.0f}"]
    steps = our_step_times(out, args.warmup) if case != "diffsynth" else progress_step_times(output, args.warmup)
    if not steps:
        return [case, "no step times found", "", "", "", f"{wall:.0f}"]
    median = statistics.median(steps)
    spread = f"{min(steps):.2f}-{max(steps):.2f}" if len(steps) > 1 else "(one mean)"
    peaks = ", ".join(f"{memory.peak[g] / 1024:.1f}" for g in sorted(memory.peak)) or "n/a (no nvidia-smi)"
    return [case, f"{median:.2f}", spread, f"{args.gpus / median:.3f}", peaks, f"{wall:.0f}"]


def run(repo: Path, args) -> None:
    cases = [c for c in args.cases if c != "diffsynth" or args.diffsynth_train]
    if "diffsynth" in args.cases and not args.diffsynth_train:
        print("diffsynth skipped: give --diffsynth-train (DiffSynth-Studio 2.1.12's "
              "examples/qwen_image/model_training/train.py)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="train_scale.", dir=args.work) as work:
        rows = [run_case(case, repo, args, Path(work)) for case in cases]
    header = ["case", "s/step (median)", "min-max", "images/s", "peak GiB per GPU (nvidia-smi)", "wall s"]
    model = "the demo DiT on the CPU (plumbing only)" if args.cpu else "the 20B DiT (random weights at full size)"
    text = caption(f"Full fine-tune of {model}, {args.gpus} processes, "
                   f"{args.size}x{args.size}, batch 1 per process, AdamW ({args.optimizer} for ours), gradient "
                   "checkpointing; each case one accelerate launch.",
                   f"median of the steps after {args.warmup} warm-up steps of {args.steps}")
    write_report("train_scale.md", text + "\n\n" + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("folder", type=Path)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("folder", type=Path)
    sub.add_parser("plumbing")
    for p in (run_parser,):
        p.add_argument("--gpus", type=int, default=4)
        p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
        p.add_argument("--diffsynth-train", type=Path)
        p.add_argument("--steps", type=int, default=12)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--size", type=int, default=1024)
        p.add_argument("--optimizer", default="adamw")
        p.add_argument("--timeout", type=int, default=3600)
        p.add_argument("--work", default=None, help="folder for outputs and logs (default: the system's temp)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.folder)
        return
    if args.command == "plumbing":  # the demo model on 2 CPU processes: the code paths, no numbers worth reading
        from qistudio.demo import write_demo_model

        with tempfile.TemporaryDirectory() as folder:
            repo = write_demo_model(Path(folder) / "demo")
            _demo_data(repo)
            args = argparse.Namespace(gpus=2, cases=["fsdp2", "zero3"], diffsynth_train=None, steps=4, warmup=1,
                                      size=64, optimizer="adamw", timeout=600, work=folder, cpu=True)
            run(repo, args)
        return
    args.cpu = False
    run(args.folder, args)


def _demo_data(repo: Path) -> None:
    from qistudio.training.demo_data import write_demo_dataset

    write_demo_dataset(repo / "data")


if __name__ == "__main__":
    main()
