"""What a training run is: frozen dataclasses for the data, the loss and the run, checked before any model loads."""

from __future__ import annotations

import dataclasses
import json
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
EXTRA_INPUTS = ("edit_image",)  # what this trainer feeds the model besides image and prompt
TRAINABLE_MODELS = ("dit",)


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

    @property
    def is_lora(self) -> bool:
        return self.lora_base_model is not None

    def check(self) -> None:
        """Every mistake in the settings, raised before any model loads."""
        self.data.check()
        self.loss.check()
        if self.is_lora == (self.trainable_models is not None):
            raise ValueError("say what to train: --lora_base_model dit (a LoRA on the DiT) or --trainable_models dit "
                             "(the whole DiT), one of the two")
        if self.trainable_models is not None and self.trainable_models not in TRAINABLE_MODELS:
            raise ValueError(f"trainable_models={self.trainable_models!r} is not supported yet; this trainer trains "
                             f"{', '.join(TRAINABLE_MODELS)}")
        if self.is_lora and self.lora_base_model != "dit":
            raise ValueError(f"lora_base_model={self.lora_base_model!r} is not supported yet; use dit")
        if self.is_lora and (self.lora_rank < 1 or not self.lora_target_modules):
            raise ValueError(f"a LoRA needs rank >= 1 and target modules; got rank {self.lora_rank}, "
                             f"targets {self.lora_target_modules}")
        unknown = [k for k in self.extra_inputs if k not in EXTRA_INPUTS]
        if unknown:
            raise ValueError(f"extra_inputs {unknown} are not supported yet; supported: {', '.join(EXTRA_INPUTS)}")
        missing_keys = [k for k in self.extra_inputs if k not in self.data.data_file_keys]
        if missing_keys:
            raise ValueError(f"extra_inputs {missing_keys} are images: add them to data_file_keys too")
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


def _tuples(values: dict) -> dict:
    # JSON turns tuples into lists; frozen dataclasses hold tuples (hashable, immutable).
    return {k: _tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _tuple(value):
    return tuple(_tuple(v) if isinstance(v, list) else v for v in value)


# Settings that change what a resume checkpoint means: a run may only resume from one that agrees on all of them.
RESUME_KEYS = ("trainable_models", "lora_base_model", "lora_target_modules", "lora_rank", "lora_alpha",
               "gradient_accumulation_steps", "seed", "lr_scheduler", "lr_warmup_steps")
