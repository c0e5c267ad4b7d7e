"""What a training run is: frozen dataclasses for the data, the loss and the run, checked before any model loads."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

# The seed's recommended LoRA targets for Qwen-Image (every script of its table uses this list).
DEFAULT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
)  # fmt: skip
TIMESTEP_SAMPLINGS = ("reference", "uniform", "logit_normal", "resolution_shift")
LOSS_WEIGHTINGS = ("bsmntw", "none")
LR_SCHEDULERS = ("reference", "constant", "cosine")
LORA_FORMATS = ("diffusers", "diffsynth")
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit", "adafactor")  # optim.py says what each keeps per parameter
# What this trainer feeds the model besides image and prompt (the seed's --extra_inputs names). All but the entity
# prompts are image files, so they must be data_file_keys too.
EXTRA_INPUTS = ("edit_image", "context_image", "blockwise_controlnet_image", "blockwise_controlnet_inpaint_mask",
                "eligen_entity_prompts", "eligen_entity_masks", "layer_input_image", "layer_num")
TEXT_INPUTS = ("eligen_entity_prompts", "layer_num")  # not files (layer_num: Qwen-Image-Layered's layer count)
# What --trainable_models trains in full, and its name inside the reference's training module: a saved file's
# names start with it, less --remove_prefix_in_ckpt.
TRAINABLE_MODELS = {"dit": "pipe.dit.", "blockwise_controlnet": "pipe.blockwise_controlnet.models.0."}


@dataclass(frozen=True)
class DataConfig:
    """Where the samples are and how their images are sized (the seed's dataset arguments)."""

    base_path: str
    metadata_path: str
    data_file_keys: tuple[str, ...] = ("image",)
    height: int | None = None  # both None: dynamic resolution (each image's own size, at most max_pixels)
    width: int | None = None
    max_pixels: int = 1024 * 1024
    repeat: int = 1
    num_workers: int = 0
    strict: bool = False  # True: a missing or unreadable image stops the run; False: it is skipped and reported

    def check(self) -> None:
        if (self.height is None) != (self.width is None):
            raise ValueError(f"give both height and width (fixed resolution) or neither (dynamic resolution); got "
                             f"height={self.height}, width={self.width}")
        if self.height is not None and (self.height < 16 or self.width < 16 or self.height % 16 or self.width % 16):
            raise ValueError(f"height and width must be multiples of 16 and at least 16, got {self.height}x{self.width}")
        if self.max_pixels < 256:
            raise ValueError(f"max_pixels must be at least 256 (16x16), got {self.max_pixels}")
        if self.repeat < 1:
            raise ValueError(f"dataset_repeat must be >= 1, got {self.repeat}")
        if "image" not in self.data_file_keys:
            raise ValueError(f"data_file_keys must include 'image' (the training target), got {self.data_file_keys}")


@dataclass(frozen=True)
class LossConfig:
    """How sigma is drawn for each sample and how the squared error is weighted (see timesteps.py)."""

    timestep_sampling: str = "reference"
    weighting: str = "bsmntw"
    reference_mu: float = 0.8  # the reference's fixed training shift
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def check(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r}; use one of {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss weighting {self.weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")
        _check_finite(self, ("reference_mu", "logit_mean", "logit_std"))
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Model sources follow the seed: `model_paths` (entries are a path or a list of shards) and
    `model_id_with_origin_paths` ("model_id:pattern" each); `tokenizer_path`/`processor_path` None take the hub's."""

    data: DataConfig
    output_path: str = "./models"
    model_paths: tuple = ()
    model_id_with_origin_paths: tuple[str, ...] = ()
    tokenizer_path: str | None = None
    processor_path: str | None = None
    extra_inputs: tuple[str, ...] = ()
    zero_cond_t: bool | None = None  # Edit-2511; None: the DiT's config.json
    # What trains: the DiT in full (trainable_models="dit") or a LoRA on it (lora_base_model="dit").
    trainable_models: str | None = None
    lora_base_model: str | None = None
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_rank: int = 32
    lora_alpha: float | None = None  # None: alpha = rank (scale 1), as the reference trains
    lora_checkpoint: str | None = None
    # Optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    num_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when reached
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "reference"  # the reference's ConstantLR (1/3 for 5 steps), "constant" or "cosine"
    lr_warmup_steps: int = 0  # linear warm-up, for "constant" and "cosine"
    use_gradient_checkpointing: bool = False
    use_gradient_checkpointing_offload: bool = False  # saved activations kept in host memory during the forward
    find_unused_parameters: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    dtype: str | None = None  # storage/compute dtype of the models; None: bfloat16 on CUDA, float32 on CPU
    device: str | None = None  # None: what accelerate chooses
    # Outputs
    remove_prefix_in_ckpt: str | None = "pipe.dit."
    save_steps: int | None = None  # None: save at the end of each epoch
    lora_format: str = "diffusers"
    keep_checkpoints: int = 1  # resume checkpoints kept; older ones are deleted once a newer one is complete
    # Little device memory (training/lowmem.py): the frozen DiT's block linears stored in FP8; a budget in GiB within
    # which the DiT's frozen blocks stream through the device (None: all resident; 0: stream every block).
    fp8_base: bool = False
    vram_limit: float | None = None
    # Regional torch.compile of the DiT's blocks (qistudio/compile.py): measured 1.6x faster steps on an H100
    # (bench/RESULTS.md), after a warm-up of a minute or two per image size.
    compile: bool = False
    # With use_gradient_checkpointing: checkpoint only the first N DiT blocks (None: all). The others keep their
    # activations, trading memory for the recompute (a full forward's worth when all are checkpointed).
    checkpointed_blocks: int | None = None
    # Throughput and monitoring (training/cache.py, buckets.py, samples.py, logs.py)
    cache_dir: str | None = None  # encode every sample once into this folder, then train without the encoders
    buckets: bool | None = None  # one target size per step on all processes; None: with dynamic size and >1 process
    validation_prompts: tuple[str, ...] = ()  # rendered to output_path/samples/step-N/ during training
    validation_steps: int | None = None  # render every N steps and at the last; None: at the last step only
    validation_size: tuple[int, int] = (1024, 1024)  # (width, height)
    validation_cfg_scale: float | None = None  # None: the model's own default (Qwen-Image 4.0; 2.1: no guidance)
    validation_num_inference_steps: int = 30
    validation_seed: int = 0
    enable_tensorboard_log: bool = False  # output_path/tensorboard_log
    enable_csv_log: bool = False  # output_path/loss.csv
    initialize_model_on_cpu: bool = False  # load on the CPU; accelerate places the DiT (ZeRO-3 partitions it)
    # Several processes (distributed.py, fsdp.py): how long any process waits for the others before the run stops
    # with a message; FSDP2 (one unit per DiT block, each process holding 1/N of the weights, gradients and
    # optimizer state), optionally with that state in host memory.
    process_group_timeout: int = 1800
    fsdp: bool = False
    fsdp_cpu_offload: bool = False
    # Memory-lean optimisation (optim.py): the optimizer, and its step taken in the backward as each parameter's
    # gradient is complete (the gradient freed at once instead of held for a step at the end).
    optimizer: str = "adamw"
    fused_optimizer_step: bool = False

    @property
    def is_lora(self) -> bool:
        return self.lora_base_model is not None

    def check(self) -> None:
        """Every mistake in the settings, raised before any model loads."""
        self.data.check()
        self.loss.check()
        # NaN passes every comparison below unnoticed (nan <= 0 is False): non-finite numbers are refused first.
        _check_finite(self, ("learning_rate", "weight_decay", "lora_alpha", "vram_limit", "validation_cfg_scale"))
        if self.is_lora == (self.trainable_models is not None):
            raise ValueError("say what to train: --lora_base_model dit (a LoRA on the DiT) or --trainable_models dit "
                             "(the whole DiT), one of the two")
        if self.trainable_models is not None and self.trainable_models not in TRAINABLE_MODELS:
            raise ValueError(f"trainable_models={self.trainable_models!r} is not supported yet; this trainer trains "
                             f"{', '.join(TRAINABLE_MODELS)}")
        if self.lora_base_model == "blockwise_controlnet":
            raise ValueError("lora_base_model=blockwise_controlnet is not supported: the seed's Blockwise ControlNet "
                             "LoRA scripts put the LoRA on the DiT (--lora_base_model dit, with the ControlNet among "
                             "the models); to train the ControlNet itself use --trainable_models blockwise_controlnet")
        if self.is_lora and self.lora_base_model != "dit":
            raise ValueError(f"lora_base_model={self.lora_base_model!r} is not supported yet; use dit")
        if self.is_lora and (self.lora_rank < 1 or not self.lora_target_modules):
            raise ValueError(f"a LoRA needs rank >= 1 and target modules; got rank {self.lora_rank}, "
                             f"targets {self.lora_target_modules}")
        self._check_inputs()
        if not self.model_paths and not self.model_id_with_origin_paths:
            raise ValueError("no model to train: give model_paths or model_id_with_origin_paths")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler={self.lr_scheduler!r}; use one of {', '.join(LR_SCHEDULERS)}")
        if self.lora_format not in LORA_FORMATS:
            raise ValueError(f"lora_format={self.lora_format!r}; use one of {', '.join(LORA_FORMATS)}")
        for name in ("num_epochs", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.lr_warmup_steps < 0:
            raise ValueError(f"need learning_rate > 0, weight_decay >= 0, lr_warmup_steps >= 0; got "
                             f"{self.learning_rate}, {self.weight_decay}, {self.lr_warmup_steps}")
        if self.lr_scheduler == "reference" and self.lr_warmup_steps:
            raise ValueError("lr_warmup_steps needs lr_scheduler 'constant' or 'cosine'; the reference schedule has "
                             "its own start (a third of the rate for 5 steps)")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype={self.dtype!r}; use bfloat16, float16 or float32")
        if (self.fp8_base or self.vram_limit is not None) and self.trainable_models == "dit":
            raise ValueError("fp8_base and vram_limit keep the DiT's base frozen; they cannot train the whole DiT "
                             "(train a LoRA on it: --lora_base_model dit)")
        if self.checkpointed_blocks is not None and (self.checkpointed_blocks < 0 or not self.use_gradient_checkpointing
                                                     or self.vram_limit is not None):
            raise ValueError(f"checkpointed_blocks={self.checkpointed_blocks} needs --use_gradient_checkpointing, "
                             "a count >= 0, and no vram_limit (streamed blocks must all be checkpointed)")
        if self.vram_limit is not None and (self.vram_limit < 0 or not self.use_gradient_checkpointing):
            raise ValueError(f"vram_limit must be >= 0 GiB (0: stream every DiT block), with "
                             f"--use_gradient_checkpointing (streamed blocks are read again in the backward); got "
                             f"vram_limit={self.vram_limit}, use_gradient_checkpointing={self.use_gradient_checkpointing}")
        self._check_validation()
        self._check_scale()

    def _check_scale(self) -> None:
        """The multi-process and optimizer settings."""
        if self.process_group_timeout < 1:
            raise ValueError(f"process_group_timeout must be >= 1 second, got {self.process_group_timeout}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ValueError("fsdp_cpu_offload keeps FSDP2's shards in host memory: it needs --fsdp")
        if self.fsdp and self.trainable_models != "dit":
            raise ValueError("fsdp shards the whole DiT (--trainable_models dit); a LoRA or a ControlNet trains with "
                             "plain data parallelism: leave out --fsdp")
        if self.fsdp and (self.compile or self.initialize_model_on_cpu):
            raise ValueError("fsdp builds the DiT on the meta device and reads each process's shard from the files: "
                             "leave out " + ("--compile (not supported with fsdp yet)" if self.compile
                                             else "--initialize_model_on_cpu"))
        if self.fused_optimizer_step and self.gradient_accumulation_steps > 1:
            raise ValueError("fused_optimizer_step applies each gradient as soon as it is computed, so there is none "
                             f"to accumulate: use gradient_accumulation_steps 1 (got {self.gradient_accumulation_steps})")

    def _check_validation(self) -> None:
        """The validation-image settings."""
        if any(not isinstance(p, str) or not p.strip() for p in self.validation_prompts):
            raise ValueError(f"validation_prompts must be non-empty text, got {self.validation_prompts!r}")
        if self.validation_steps is not None and not self.validation_prompts:
            raise ValueError(f"validation_steps={self.validation_steps} renders nothing without validation_prompts")
        if self.validation_steps is not None and self.validation_steps < 1:
            raise ValueError(f"validation_steps must be >= 1 (or unset), got {self.validation_steps}")
        width, height = self.validation_size
        if width < 16 or height < 16 or width % 16 or height % 16:
            raise ValueError(f"validation_size must be multiples of 16 and at least 16, got {width}x{height}")
        if self.validation_num_inference_steps < 1 or (self.validation_cfg_scale is not None
                                                        and self.validation_cfg_scale <= 0):
            raise ValueError(f"need validation_num_inference_steps >= 1 and validation_cfg_scale > 0; got "
                             f"{self.validation_num_inference_steps}, {self.validation_cfg_scale}")

    def _check_inputs(self) -> None:
        """The extra inputs against each other, the data's file keys and what trains."""
        inputs, file_keys = self.extra_inputs, self.data.data_file_keys
        unknown = [k for k in inputs if k not in EXTRA_INPUTS]
        if unknown:
            raise ValueError(f"extra_inputs {unknown} are not supported yet; supported: {', '.join(EXTRA_INPUTS)}")
        missing_keys = [k for k in inputs if k not in file_keys and k not in TEXT_INPUTS]
        if missing_keys:
            raise ValueError(f"extra_inputs {missing_keys} are images: add them to data_file_keys too")
        text_keys = [k for k in TEXT_INPUTS if k in file_keys]
        if text_keys:
            raise ValueError(f"{text_keys} are text, not files: leave them out of data_file_keys")
        eligen = {"eligen_entity_prompts", "eligen_entity_masks"} & set(inputs)
        if len(eligen) == 1:
            raise ValueError(f"extra_inputs has {eligen.pop()} alone; EliGen needs both eligen_entity_prompts and "
                             "eligen_entity_masks (one mask per entity prompt)")
        if eligen and {"edit_image", "context_image"} & set(inputs):
            raise ValueError("EliGen entities with edit or context images are not supported (the pipeline refuses "
                             "them too); train them separately")
        if "blockwise_controlnet_inpaint_mask" in inputs and "blockwise_controlnet_image" not in inputs:
            raise ValueError("extra_inputs blockwise_controlnet_inpaint_mask needs blockwise_controlnet_image too (the "
                             "image whose masked region the Inpaint ControlNet sees blacked out)")
        if self.trainable_models == "blockwise_controlnet" and "blockwise_controlnet_image" not in inputs:
            raise ValueError("trainable_models=blockwise_controlnet needs the control maps: add "
                             "blockwise_controlnet_image to extra_inputs and data_file_keys")
        prefix = TRAINABLE_MODELS.get(self.trainable_models)
        if prefix and self.remove_prefix_in_ckpt and not prefix.startswith(self.remove_prefix_in_ckpt):
            raise ValueError(f"remove_prefix_in_ckpt={self.remove_prefix_in_ckpt!r} is not how the trained "
                             f"{self.trainable_models}'s names start ({prefix}...), so it would strip nothing; use "
                             f"--remove_prefix_in_ckpt {prefix} for the released file's names")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        values["data"] = DataConfig(**_tuples(values["data"]))
        values["loss"] = LossConfig(**values.get("loss", {}))
        return cls(**_tuples(values))


def _check_finite(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def _tuples(values: dict) -> dict:
    # JSON turns tuples into lists; frozen dataclasses hold tuples (hashable, immutable).
    return {k: _tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _tuple(value):
    return tuple(_tuple(v) if isinstance(v, list) else v for v in value)


# Settings that change what a resume checkpoint means: a run may only resume from one that agrees on all of them.
# (And on the samples per optimizer step, processes x gradient_accumulation_steps: the loop checks that.)
RESUME_KEYS = ("trainable_models", "lora_base_model", "lora_target_modules", "lora_rank", "lora_alpha", "seed",
               "lr_scheduler", "lr_warmup_steps", "buckets", "optimizer")
