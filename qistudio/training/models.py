"""The seed's model arguments -> ModelConfigs -> loaded components, with the frozen models set up for training."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..components import Components, detect_kind, load_components
from ..models.controlnet import ControlNetConfig, QwenImageBlockwiseControlNet
from ..weights.formats import DIT
from ..weights.hub import resolve_files
from ..weights.model_config import ModelConfig
from .config import TrainConfig
from ..layered import require_layered_models
from .family import LAYERED, QWEN21, QWEN_IMAGE, family_of_components

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = ("Qwen/Qwen-Image", "tokenizer/")
DEFAULT_PROCESSOR = ("Qwen/Qwen-Image-Edit", "processor/")
DEFAULT_QWEN21 = "Qwen/Qwen-Image-2.1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hub_config(spec: str) -> ModelConfig:
    """'model_id:origin_file_pattern' (the seed's --model_id_with_origin_paths entry) -> ModelConfig."""
    model_id, sep, pattern = spec.partition(":")
    if not sep or not model_id or not pattern:
        raise ValueError(f"expected MODEL_ID:FILE_PATTERN such as Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors,"
                         f" got {spec!r}")
    return ModelConfig(model_id=model_id, origin_file_pattern=pattern)


def weight_configs(config: TrainConfig) -> list[ModelConfig]:
    """The ModelConfigs of --model_paths and --model_id_with_origin_paths, in that order."""
    configs = [ModelConfig(path=list(p) if isinstance(p, (list, tuple)) else str(p)) for p in config.model_paths]
    return configs + [hub_config(spec) for spec in config.model_id_with_origin_paths]


def _dit_model_id(config: TrainConfig, default: str) -> str:
    """The hub id the DiT comes from (its transformer/ pattern), whose processor/ goes with it."""
    return next((spec.partition(":")[0] for spec in config.model_id_with_origin_paths
                 if spec.partition(":")[2].startswith("transformer")), default)


def model_configs(config: TrainConfig, family: str = QWEN_IMAGE) -> tuple[list[ModelConfig], ModelConfig | None,
                                                                           ModelConfig | None]:
    """(model configs, tokenizer config, processor config or None) as the seed's train.py builds them. Qwen-Image
    2.1 reads prompts through its Qwen3-VL processor (its repository has processor/ and no tokenizer/)."""
    configs = weight_configs(config)
    if family == QWEN21:
        tokenizer = ModelConfig(path=config.tokenizer_path) if config.tokenizer_path else None
        processor = (ModelConfig(path=config.processor_path) if config.processor_path
                     else ModelConfig(model_id=_dit_model_id(config, DEFAULT_QWEN21), origin_file_pattern="processor/"))
        return configs, tokenizer, processor
    tokenizer = (ModelConfig(path=config.tokenizer_path) if config.tokenizer_path
                 else ModelConfig(model_id=DEFAULT_TOKENIZER[0], origin_file_pattern=DEFAULT_TOKENIZER[1]))
    processor = None
    if "edit_image" in config.extra_inputs:
        processor = (ModelConfig(path=config.processor_path) if config.processor_path
                     else ModelConfig(model_id=DEFAULT_PROCESSOR[0], origin_file_pattern=DEFAULT_PROCESSOR[1]))
    return configs, tokenizer, processor


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype is not None:
        return DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_training_components(config: TrainConfig, device: torch.device, dtype: torch.dtype,
                             dit_blocks_on_disk: bool = False, family: str = QWEN_IMAGE) -> Components:
    """The models; with `dit_blocks_on_disk` the DiT's block weights are left in the files (FSDP2 reads each
    process's shard of them: fsdp.py), their parameters meta tensors and `components.disk_sources["dit"]` their
    keys. `family` (family.py) picks the tokenizer and processor defaults."""
    configs, tokenizer, processor = model_configs(config, family)
    if dit_blocks_on_disk:
        configs = [dataclasses.replace(c, offload_device="disk") if detect_kind(resolve_files(c)) == DIT else c
                   for c in configs]
    components = load_components(configs, tokenizer, processor, dtype, device)
    prepare_frozen(components, config)
    if dit_blocks_on_disk:
        from .fsdp import meta_blocks

        meta_blocks(components.dit, components.disk_sources["dit"])
    return components


def prepare_frozen(components: Components, config: TrainConfig) -> None:
    """The DiT, VAE and text encoder must all be there, and the ControlNet the inputs need; every model is frozen
    (what trains is unfrozen later) and the VAE and text encoder only encode, in eval mode."""
    components.require("dit", "vae", "text_encoder")
    if family_of_components(components) == LAYERED:
        require_layered_models(components)  # the RGBA VAE beside the Layered DiT, before any sample is encoded
    if config.trainable_models == "blockwise_controlnet" and not components.controlnets:
        components.controlnets.append(new_controlnet(components, config))
    check_controlnets(components, config)
    for model in (components.vae, components.text_encoder, *components.controlnets):
        model.requires_grad_(False)
        model.eval()


def new_controlnet(components: Components, config: TrainConfig) -> QwenImageBlockwiseControlNet:
    """A Blockwise ControlNet sized for the DiT, every output (img_in, output_proj) at zero, as the reference's
    Initialize scripts make one: it changes nothing until it has learned something."""
    dit = components.dit
    inpaint = "blockwise_controlnet_inpaint_mask" in config.extra_inputs
    cfg = ControlNetConfig(num_layers=dit.config.num_layers, dim=dit.config.dim,
                           additional_in_channels=4 if inpaint else 0)
    weight = dit.img_in.weight
    with torch.random.fork_rng(devices=[]):  # input_proj's random start follows the run's seed alone
        torch.manual_seed(config.seed)
        net = QwenImageBlockwiseControlNet(cfg).to(device=weight.device, dtype=weight.dtype).zero_init()
    logger.info("no ControlNet among the models: training a new %sBlockwise ControlNet from zero-initialised outputs",
                "Inpaint " if inpaint else "")
    return net


def check_controlnets(components: Components, config: TrainConfig) -> None:
    """ControlNet inputs need a Blockwise ControlNet (id 0) of the matching kind; training one needs exactly one."""
    if not {"blockwise_controlnet_image", "blockwise_controlnet_inpaint_mask"} & set(config.extra_inputs):
        return
    nets = components.controlnets
    if not nets:
        raise ValueError("extra_inputs blockwise_controlnet_image needs a Blockwise ControlNet among the models, e.g. "
                         "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny:model.safetensors")
    if not isinstance(nets[0], QwenImageBlockwiseControlNet):
        raise ValueError(f"the first ControlNet is a {type(nets[0]).__name__}; the blockwise_controlnet_* inputs "
                         "are for a Blockwise ControlNet (DiffSynth-Studio's), list it first")
    if config.trainable_models == "blockwise_controlnet" and len(nets) > 1:
        raise ValueError(f"trainable_models=blockwise_controlnet trains one ControlNet, but {len(nets)} are loaded; "
                         "give only the one to train (or none, to train a new one)")
    inpaint_net = bool(nets[0].config.additional_in_channels)
    inpaint_data = "blockwise_controlnet_inpaint_mask" in config.extra_inputs
    if inpaint_net != inpaint_data:
        raise ValueError("the ControlNet is an Inpaint ControlNet: add blockwise_controlnet_inpaint_mask to "
                         "extra_inputs and data_file_keys" if inpaint_net else
                         "extra_inputs has blockwise_controlnet_inpaint_mask but the ControlNet has no mask channel; "
                         "load an Inpaint ControlNet (DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint)")
