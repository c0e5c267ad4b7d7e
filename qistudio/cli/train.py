"""`qistudio train`: the seed's train.py arguments (same names, same meanings) -> a TrainConfig -> a Trainer.

Runs as is on one device, or on several under `torchrun --standalone --nproc_per_node N -m qistudio.cli.main
train ...` or `accelerate launch --module qistudio.cli.main train ...` (gloo on the CPU). Every
argument of the seed's parser is accepted; those this trainer does not implement yet stop with a clear message
(status 2) before anything loads, rather than being silently ignored. Settings errors are argparse errors
(status 2); a failure while loading or saving prints one message and gives status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..training.errors import CheckpointSaveError, NonFiniteError, ProcessGroupError, RunLockedError, RunStopped
from ..training.config import (DEFAULT_LORA_TARGETS, LOSS_WEIGHTINGS, LORA_FORMATS, LR_SCHEDULERS, OPTIMIZERS,
                               TIMESTEP_SAMPLINGS, DataConfig, LossConfig, TrainConfig)
from .generate import finite_float, parse_size

PROG = "qistudio train"
# The seed's arguments this trainer does not implement yet: flag -> what to do instead.
NOT_SUPPORTED = {
    "fp8_models": "use --fp8_base (the frozen DiT's block linears in FP8 under the LoRA)",
    "offload_models": "two-stage split training is not supported yet",
    "resume_from_checkpoint": "use --resume (continues a run of this trainer from output_path/checkpoints)",
    "quant_options": "quantised bases are not supported yet",
    "customized_optimizer": f"choose one with --optimizer ({', '.join(OPTIMIZERS)})",
    "preset_lora_path": "differential LoRA training is not supported yet",
    "preset_lora_model": "differential LoRA training is not supported yet",
    "template_model_id_or_path": "template models are not supported yet",
    "enable_lora_hot_loading": "LoRA hot loading during training is not supported yet",
    "enable_model_cpu_offload": "model CPU offload during training is not supported yet",
    "enable_optimizer_cpu_offload": "use --fsdp --fsdp_cpu_offload, or a DeepSpeed config with offload",
    "cpu_offload_split_threshold": "model CPU offload during training is not supported yet",
    "enable_swanlab_log": "logging backends are not supported yet",
    "swanlab_project": "logging backends are not supported yet",
    "enable_wandb_log": "logging backends are not supported yet",
    "wandb_project": "logging backends are not supported yet",
}
FLAGS = {"enable_lora_hot_loading", "enable_model_cpu_offload", "enable_optimizer_cpu_offload", "enable_swanlab_log",
         "enable_wandb_log"}
BUCKETS = {"auto": None, "on": True, "off": False}
DEFAULT_OUTPUT, DEMO_OUTPUT = "./models", "./models/train/demo_lora"
DEMO_DATASET = "demo_dataset"  # inside the output folder: the generated images and metadata.csv


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a LoRA on the DiT, the whole DiT or a Blockwise ControlNet",
        description="Train Qwen-Image's DiT (LoRA or full) or a Blockwise ControlNet with the reference's flow-matching loss; "
        "Qwen-Image-Layered and Qwen-Image 2.1 train alike, told from the DiT's files. Argument names "
        "follow DiffSynth-Studio's train.py; run under `accelerate launch --module qistudio.cli.main train` for "
        "several GPUs. Try it first with --demo: a LoRA on a tiny random model and a generated mini dataset, in "
        "seconds on a CPU.",
    )  # fmt: skip
    p.add_argument("--demo", action="store_true",
                   help=f"train a LoRA on the tiny random demo model (as `generate --demo` uses) and a generated mini "
                   f"dataset (OUTPUT_PATH/{DEMO_DATASET}: eight drawn shapes with captions), in seconds on the CPU; "
                   f"output in {DEMO_OUTPUT} unless --output_path says otherwise. Shows the whole flow and the "
                   "files a run writes; the LoRA learns nothing useful")
    _add_data_and_model_arguments(p)
    _add_training_arguments(p)
    _add_monitoring_arguments(p)
    seed_only = p.add_argument_group("the seed's arguments not supported yet (accepted, refused if used)")
    for name in NOT_SUPPORTED:
        if name in FLAGS:
            seed_only.add_argument(f"--{name}", action="store_true", default=None, help=argparse.SUPPRESS)
        else:
            seed_only.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.set_defaults(run=run, parser=p)
    return p


def _add_data_and_model_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset_base_path", help="folder the metadata's image paths are relative to (required "
                      "unless --demo)")
    data.add_argument("--dataset_metadata_path", help="metadata file: .csv, .json or .jsonl with image and prompt")
    data.add_argument("--max_pixels", type=int, default=1024 * 1024,
                      help="dynamic resolution: larger images are scaled down to this area (default 1048576)")
    data.add_argument("--height", type=int, help="fixed height (with --width); leave both out for dynamic resolution")
    data.add_argument("--width", type=int, help="fixed width (with --height)")
    data.add_argument("--data_file_keys", default="image", help="metadata columns that are image paths (comma-separated)")
    data.add_argument("--dataset_repeat", type=int, default=1, help="times the dataset is repeated per epoch")
    data.add_argument("--dataset_num_workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument("--strict", action="store_true", help="stop at a missing or unreadable image instead of "
                      "skipping it (skipped ones are listed at the end)")
    model = p.add_argument_group("models")
    model.add_argument("--model_paths", help="JSON list of local model files; a list inside it is one model's shards")
    model.add_argument("--model_id_with_origin_paths",
                       help="comma-separated MODEL_ID:PATTERN, e.g. Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors")
    model.add_argument("--tokenizer_path", help="tokenizer folder (default: download Qwen/Qwen-Image:tokenizer/)")
    model.add_argument("--processor_path", help="processor folder for edit images (default: Qwen/Qwen-Image-Edit:processor/;"
                       " for Qwen-Image 2.1, told from its DiT's files, the DiT repository's processor/)")
    model.add_argument("--extra_inputs", help="extra model inputs from the metadata (comma-separated): edit_image, "
                       "context_image, blockwise_controlnet_image, blockwise_controlnet_inpaint_mask, "
                       "eligen_entity_prompts, eligen_entity_masks; Qwen-Image-Layered: layer_num, layer_input_image "
                       "(image then lists the composite and the layers)")
    model.add_argument("--zero_cond_t", action="store_true", default=None, help="Edit-2511's modulation of edit tokens")
    model.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                       help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    model.add_argument("--device", help="cpu to train on the CPU (default: what accelerate chooses)")


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training")
    train.add_argument("--learning_rate", type=finite_float, default=1e-4)
    train.add_argument("--weight_decay", type=finite_float, default=0.01)
    train.add_argument("--num_epochs", type=int, default=1, help="passes over the dataset (default 1; --max_steps "
                       "overrides)")
    train.add_argument("--max_steps", type=int, help="optimizer steps to train; wins over --num_epochs as in "
                       "diffusers' and accelerate's scripts: fewer steps end the run early, more run further epochs")
    train.add_argument("--trainable_models", help="train this model in full: dit, or blockwise_controlnet (the "
                       "ControlNet among the models, or a new zero-initialised one; the DiT stays frozen)")
    train.add_argument("--find_unused_parameters", action="store_true", help="DDP: some parameters get no gradient")
    train.add_argument("--task", default="sft", help="training task (supported: sft)")
    train.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="reference",
                       help="reference: ConstantLR (a third of the rate for 5 steps), as the seed; constant; cosine")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps (constant, cosine)")
    train.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLINGS, default="reference",
                       help="reference: uniform over the 1000-step schedule at mu 0.8 (default); uniform; "
                       "logit_normal; resolution_shift (the inference shift of each image's size)")
    train.add_argument("--loss_weighting", choices=LOSS_WEIGHTINGS, default="bsmntw",
                       help="bsmntw: the reference's bump around t=500 (default); none")
    train.add_argument("--seed", type=int, default=0, help="data order, noise, timesteps and LoRA initialisation")
    output = p.add_argument_group("output")
    output.add_argument("--output_path", help=f"folder for the weights, checkpoints and logs (default "
                        f"{DEFAULT_OUTPUT}; {DEMO_OUTPUT} with --demo); one run at a time writes to it")
    output.add_argument("--remove_prefix_in_ckpt", default="pipe.dit.",
                        help="full training: prefix stripped from the saved names (default pipe.dit.: plain DiT names)")
    output.add_argument("--save_steps", type=int, help="save every N steps (default: at the end of each epoch)")
    output.add_argument("--lora_format", choices=LORA_FORMATS, default="diffusers",
                        help="diffusers: transformer.* (loads in diffusers, ComfyUI and qistudio; default); "
                        "diffsynth: the reference trainer's *.lora_A.default.weight")
    output.add_argument("--keep_checkpoints", type=int, default=1, help="resume checkpoints kept (default 1)")
    output.add_argument("--resume", nargs="?", const="latest",
                        help="continue from the latest checkpoint under --output_path, or from the folder given")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_base_model", help="the model the LoRA is added to (supported: dit)")
    lora.add_argument("--lora_target_modules", default=",".join(DEFAULT_LORA_TARGETS),
                      help="comma-separated module names (default: the seed's Qwen-Image list)")
    lora.add_argument("--lora_rank", type=int, default=32)
    lora.add_argument("--lora_alpha", type=finite_float, help="default: the rank (scale 1, as the reference)")
    lora.add_argument("--lora_checkpoint", help="continue from this LoRA file (any layout qistudio reads)")
    memory = p.add_argument_group("memory")
    memory.add_argument("--use_gradient_checkpointing", action="store_true")
    memory.add_argument("--use_gradient_checkpointing_offload", action="store_true")
    memory.add_argument("--checkpointed_blocks", type=int, metavar="N", help="with --use_gradient_checkpointing: "
                        "checkpoint only the first N DiT blocks; the rest keep their activations (less recompute, "
                        "more memory; default: all)")
    memory.add_argument("--gradient_accumulation_steps", type=int, default=1)
    memory.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="adamw (states in the weights' dtype; default); adamw_bf16 (states in bfloat16); "
                        "adamw_8bit (bitsandbytes, 8-bit states: pip install 'qistudio[lowmem]'); adafactor "
                        "(factored second moments, no first)")
    memory.add_argument("--fused_optimizer_step", action="store_true",
                        help="step each parameter as soon as its gradient is complete in the backward and free that "
                        "gradient (no gradient held for the whole model; needs --gradient_accumulation_steps 1)")
    memory.add_argument("--fp8_base", action="store_true",
                        help="store the frozen DiT's block linears in FP8 (e4m3, per-channel scales; LoRA stays float32)")
    memory.add_argument("--vram_limit", type=finite_float, help="device memory budget in GiB for the DiT: the frozen blocks "
                        "that do not fit stream from host memory (0: stream all; needs --use_gradient_checkpointing)")


def _add_monitoring_arguments(p: argparse.ArgumentParser) -> None:
    speed = p.add_argument_group("throughput")
    speed.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT's blocks (about "
                       "1.6x faster steps on an H100 after a warm-up of a minute or two per image size)")
    speed.add_argument("--cache", metavar="DIR", help="encode every sample once (text encoder + VAE) into DIR, then "
                       "train the DiT from it with the encoders released; stale entries are re-encoded")
    speed.add_argument("--buckets", choices=tuple(BUCKETS), default="auto",
                       help="dynamic resolution: give all processes samples of one size at each step (auto: on with "
                       "dynamic resolution and several processes)")
    scale = p.add_argument_group("several processes (torchrun or accelerate launch)")
    scale.add_argument("--fsdp", action="store_true",
                       help="full DiT training with FSDP2: one unit per DiT block, each process holding 1/N of the "
                       "weights, gradients and optimizer state, read from the files by shard (also set by an "
                       "accelerate config with fsdp_version: 2)")
    scale.add_argument("--fsdp_cpu_offload", action="store_true",
                       help="with --fsdp: keep the shards, their gradients and optimizer state in host memory")
    scale.add_argument("--process_group_timeout", type=int, default=1800, metavar="SECONDS",
                       help="how long a process waits for the others before the run stops with a message "
                       "(default 1800)")
    speed.add_argument("--initialize_model_on_cpu", action="store_true",
                       help="load the models into host memory first, for DeepSpeed ZeRO-3 to partition a LoRA's or "
                       "ControlNet's base from there (a full DiT fine-tune needs none: each process reads its part)")
    watch = p.add_argument_group("validation images and logs")
    watch.add_argument("--validation_prompts", nargs="+", metavar="PROMPT",
                       help="prompts to render during training, or one .txt file with a prompt per line")
    watch.add_argument("--validation_steps", type=int, help="render every N steps (default: at the last step only)")
    watch.add_argument("--validation_size", type=parse_size, default=(1024, 1024), metavar="WxH",
                       help="size of the validation images (default 1024x1024)")
    watch.add_argument("--validation_cfg_scale", type=finite_float, default=None,
                       help="guidance of the validation images (default: the model's, 4.0 for Qwen-Image; Qwen-Image "
                            "2.1 samples without guidance)")
    watch.add_argument("--validation_num_inference_steps", type=int, default=30)
    watch.add_argument("--validation_seed", type=int, default=0)
    watch.add_argument("--enable_tensorboard_log", action="store_true",
                       help="TensorBoard events in output_path/tensorboard_log (needs the tensorboard package)")
    watch.add_argument("--enable_csv_log", action="store_true", help="output_path/loss.csv: step, loss, lr, time")


def _validation_prompts(values: list[str] | None, error) -> tuple[str, ...]:
    """The prompts themselves, or one .txt file holding a prompt per line (blank lines skipped)."""
    if not values:
        return ()
    if len(values) == 1 and values[0].endswith(".txt"):
        path = Path(values[0])
        if not path.is_file():
            error(f"--validation_prompts {values[0]}: no such file (a .txt value is read as a file of prompts)")
        return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return tuple(values)


def _model_paths(text: str | None, error) -> tuple:
    if not text:
        return ()
    try:
        paths = json.loads(text)
    except json.JSONDecodeError as e:
        error(f"--model_paths must be a JSON list of paths (a nested list for shards): {e}")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, (str, list)) for p in paths):
        error(f"--model_paths must be a JSON list of paths or lists of shard paths, got {text!r}")
    for entry in paths:
        for path in entry if isinstance(entry, list) else [entry]:
            if not Path(path).exists():
                error(f"--model_paths: no such file or folder {path}")
    return tuple(tuple(e) if isinstance(e, list) else e for e in paths)


def _demo_arguments(args: argparse.Namespace, error) -> tuple[str, ...]:
    """--demo: the demo model (built by run()) and the generated dataset in OUTPUT_PATH/demo_dataset stand in for
    the model and dataset arguments; a LoRA on the DiT unless --trainable_models says otherwise. The model paths."""
    given = [f"--{name}" for name in ("model_paths", "model_id_with_origin_paths", "tokenizer_path", "processor_path",
                                      "dataset_base_path", "dataset_metadata_path", "extra_inputs")
             if getattr(args, name)]
    if given:
        error(f"--demo brings its own model and dataset; leave out {', '.join(given)}")
    from ..demo import default_demo_dir  # torch: the arguments are good by now

    folder = default_demo_dir()
    args.output_path = args.output_path or DEMO_OUTPUT
    args.dataset_base_path = str(Path(args.output_path) / DEMO_DATASET)
    args.dataset_metadata_path = str(Path(args.dataset_base_path) / "metadata.csv")
    args.tokenizer_path = str(folder / "tokenizer")
    if not args.trainable_models:
        args.lora_base_model = args.lora_base_model or "dit"
    return tuple(str(folder / name) for name in ("transformer", "text_encoder", "vae"))


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the arguments describe, or parser.error (status 2) naming what is wrong."""
    error = args.parser.error
    used = [name for name in NOT_SUPPORTED if getattr(args, name) not in (None, False)]
    if used:
        error(f"--{used[0]} is not supported yet: {NOT_SUPPORTED[used[0]]}")
    if args.task != "sft":
        error(f"--task {args.task} is not supported yet; this trainer runs sft (supervised fine-tuning)")
    model_paths = _demo_arguments(args, error) if args.demo else _model_paths(args.model_paths, error)
    args.output_path = args.output_path or DEFAULT_OUTPUT
    if not args.dataset_base_path:
        error("--dataset_base_path is required (or --demo, to try training on a generated mini dataset)")
    if not args.dataset_metadata_path:
        error("--dataset_metadata_path is required (the reference's cached .pth files are not read; --cache DIR "
              "encodes the samples once and trains from its own cache)")
    for flag, value in (("--dataset_base_path", args.dataset_base_path),
                        ("--dataset_metadata_path", args.dataset_metadata_path)):
        if not args.demo and not Path(value).exists():
            error(f"{flag} {value}: no such file or folder")
    data = DataConfig(
        base_path=args.dataset_base_path, metadata_path=args.dataset_metadata_path,
        data_file_keys=_split(args.data_file_keys), height=args.height, width=args.width, max_pixels=args.max_pixels,
        repeat=args.dataset_repeat, num_workers=args.dataset_num_workers, strict=args.strict,
    )  # fmt: skip
    config = TrainConfig(
        data=data, output_path=args.output_path, model_paths=model_paths,
        model_id_with_origin_paths=_split(args.model_id_with_origin_paths), tokenizer_path=args.tokenizer_path,
        processor_path=args.processor_path, extra_inputs=_split(args.extra_inputs), zero_cond_t=args.zero_cond_t,
        trainable_models=args.trainable_models, lora_base_model=args.lora_base_model,
        lora_target_modules=_split(args.lora_target_modules), lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_checkpoint=args.lora_checkpoint, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        num_epochs=args.num_epochs, max_steps=args.max_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps, use_gradient_checkpointing=args.use_gradient_checkpointing,
        use_gradient_checkpointing_offload=args.use_gradient_checkpointing_offload,
        find_unused_parameters=args.find_unused_parameters,
        loss=LossConfig(timestep_sampling=args.timestep_sampling, weighting=args.loss_weighting), seed=args.seed,
        dtype=args.dtype, device=args.device, remove_prefix_in_ckpt=args.remove_prefix_in_ckpt or None,
        save_steps=args.save_steps, lora_format=args.lora_format, keep_checkpoints=args.keep_checkpoints,
        fp8_base=args.fp8_base, vram_limit=args.vram_limit, compile=args.compile,
        checkpointed_blocks=args.checkpointed_blocks,
        cache_dir=args.cache, buckets=BUCKETS[args.buckets],
        validation_prompts=_validation_prompts(args.validation_prompts, error), validation_steps=args.validation_steps,
        validation_size=args.validation_size, validation_cfg_scale=args.validation_cfg_scale,
        validation_num_inference_steps=args.validation_num_inference_steps, validation_seed=args.validation_seed,
        enable_tensorboard_log=args.enable_tensorboard_log, enable_csv_log=args.enable_csv_log,
        initialize_model_on_cpu=args.initialize_model_on_cpu, process_group_timeout=args.process_group_timeout,
        fsdp=args.fsdp, fsdp_cpu_offload=args.fsdp_cpu_offload, optimizer=args.optimizer,
        fused_optimizer_step=args.fused_optimizer_step,
    )  # fmt: skip
    try:
        config.check()
    except ValueError as e:
        error(str(e))
    if args.lora_checkpoint and not Path(args.lora_checkpoint).exists():
        error(f"--lora_checkpoint {args.lora_checkpoint}: no such file")
    if args.cache and Path(args.cache).exists() and not Path(args.cache).is_dir():
        error(f"--cache {args.cache} is a file; give a folder (created if missing)")
    return config


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    from ..training.loop import Trainer  # torch, accelerate and peft load only once the arguments are good

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.demo:
            _write_demo(config)
        trainer = Trainer(config, resume=args.resume)
        history = trainer.run()
    except (CheckpointSaveError, NonFiniteError, ProcessGroupError, RunLockedError, ValueError, OSError,
            ImportError) as e:
        print(f"{PROG}: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    except RunStopped as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 143
    if trainer.accelerator.is_main_process:
        if history:
            print(f"trained {trainer.progress.step} steps, last loss {history[-1].loss:.4f}; weights in "
                  f"{config.output_path}")
        else:
            print(f"nothing left to train: the run had done its {trainer.progress.step} steps; weights in "
                  f"{config.output_path}")
        if args.demo and trainer.last_saved is not None and config.is_lora:
            print(f"try the LoRA: qistudio generate --demo --lora {trainer.last_saved} "
                  f"\"a red circle on a white background\" -o demo_lora.png")
    trainer.accelerator.end_training()  # ends the process group of a multi-process run
    return 0


def _write_demo(config: TrainConfig) -> None:
    """The demo model (shared with `generate --demo`, built once) and the mini dataset, where the config says."""
    from ..demo import default_demo_dir, write_demo_model
    from ..training.demo_data import write_demo_dataset

    write_demo_model(default_demo_dir())
    write_demo_dataset(config.data.base_path)
