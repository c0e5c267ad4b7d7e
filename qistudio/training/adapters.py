"""What trains: a peft LoRA on the DiT's linears, the whole DiT or a Blockwise ControlNet; and the trained tensors
taken back out.

LoRA (peft `inject_adapter_in_model`, adapter "default"; A Kaiming-uniform, B zero, so training starts from the
base model exactly). Each targeted linear becomes a peft layer holding the original as `base_layer`, so parameter
names gain `.base_layer` and `.lora_A.default` / `.lora_B.default`; `lora_pairs` reads them back as plain module
names. The LoRA factors are kept in float32 whatever the base dtype (the reference keeps them in bfloat16); peft
casts the layer input to them and the sum back to the base layer's dtype.

Full training trains every parameter of the DiT, or of the (first) Blockwise ControlNet with the DiT frozen, in
the models' dtype (bfloat16 on a GPU, as the reference does; float32 master weights are not kept).

`lora_checkpoint` (the seed's --lora_checkpoint) continues from a LoRA file in any layout qistudio reads; its
alpha / rank is folded into B, so the layer computes the file's delta whatever our own alpha is.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from ..components import Components
from ..lora import convert_lora_state_dict
from ..lora.files import read_lora
from .config import TrainConfig

logger = logging.getLogger(__name__)
ADAPTER = "default"


def add_lora(dit: nn.Module, config: TrainConfig) -> list[str]:
    """Inject a LoRA into `dit` (in place, base frozen); returns the names of the targeted modules."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:  # pragma: no cover - peft is a training dependency
        raise ImportError("LoRA training needs peft: pip install 'qistudio[train]'") from None
    dit.requires_grad_(False)
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    lora_config = LoraConfig(r=config.lora_rank, lora_alpha=alpha, target_modules=list(config.lora_target_modules),
                             init_lora_weights=True)
    try:
        inject_adapter_in_model(lora_config, dit, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"lora_target_modules {','.join(config.lora_target_modules)}: {e}") from None
    for name, param in dit.named_parameters():
        if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    modules = sorted(lora_layers(dit))
    if config.lora_checkpoint:
        load_lora_checkpoint(dit, config.lora_checkpoint)
    return modules


def lora_layers(dit: nn.Module) -> dict[str, nn.Module]:
    """{module name: peft LoRA layer} of the DiT."""
    return {name: m for name, m in dit.named_modules() if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A")}


def lora_pairs(dit: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A (rank, in), B (out, rank), scale)}: the layer adds scale * x A^T B^T."""
    return {
        name: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER]))
        for name, layer in lora_layers(dit).items()
    }


def load_lora_checkpoint(dit: nn.Module, source) -> None:
    """Start the injected LoRA from a file (or state dict); every layer of the file must meet one of ours."""
    lora_file = read_lora(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # text-encoder layers are reported below, as not trained here
        folded = convert_lora_state_dict(lora_file.tensors, "diffsynth", peft_config=lora_file.peft_config)
    layers = lora_layers(dit)
    found, foreign = 0, []
    for key, tensor in folded.items():
        module, _, part = key.partition(".lora_")
        if module not in layers:
            foreign.append(module)
            continue
        layer = layers[module]
        target = layer.lora_A[ADAPTER].weight if part.startswith("A") else layer.lora_B[ADAPTER].weight
        if tensor.shape != target.shape:
            raise ValueError(f"lora_checkpoint {lora_file.description}: {module} has shape {tuple(tensor.shape)}, the "
                             f"new LoRA {tuple(target.shape)}; set --lora_rank to the checkpoint's rank")
        value = tensor.float()
        if part.startswith("B"):
            value = value / float(layer.scaling[ADAPTER])  # the file's delta, whatever our alpha
        with torch.no_grad():
            target.copy_(value)
        found += 1
    if foreign:
        raise ValueError(f"lora_checkpoint {lora_file.description} has layers this LoRA does not target "
                         f"(first: {sorted(set(foreign))[:3]}); add them to --lora_target_modules")
    missing = len(layers) - found // 2
    if missing:
        logger.warning("lora_checkpoint covers %d of %d LoRA layers; the other %d start from zero", found // 2,
                       len(layers), missing)


def lora_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA in PEFT's plain layout: `<module>.lora_A.weight`, `.lora_B.weight` and `.alpha`."""
    out = {}
    for name, (down, up, scale) in lora_pairs(dit).items():
        rank = down.shape[0]
        out[f"{name}.lora_A.weight"] = down.detach()
        out[f"{name}.lora_B.weight"] = up.detach()
        out[f"{name}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out


def make_trainable(components: Components, config: TrainConfig) -> tuple[nn.Module, list[str]]:
    """Set up what trains (a LoRA on the DiT, the whole DiT or the ControlNet); returns the module whose trainable
    tensors are saved (the DiT or the ControlNet) and a one-line description per trained group."""
    dit = components.dit
    if config.is_lora:
        modules = add_lora(dit, config)
        freeze_unreachable(dit)
        return dit, [f"LoRA rank {config.lora_rank} on {len(modules)} layers of the DiT"]
    dit.requires_grad_(False)
    model = components.controlnets[0] if config.trainable_models == "blockwise_controlnet" else dit
    model.requires_grad_(True)
    freeze_unreachable(dit)
    name = "the Blockwise ControlNet (DiT frozen)" if model is not dit else "the whole DiT"
    return model, [f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)"]


def freeze_unreachable(dit: nn.Module) -> list[str]:
    """Freeze the parameters no loss can reach; returns their names.

    The DiT returns image tokens only, so the last block's text-stream output (its attention's `to_add_out` and its
    `txt_mlp`, with any LoRA on them) feeds nothing and never gets a gradient. One process passes over them anyway
    (AdamW skips a parameter without gradient), but DDP would wait for their gradients forever (the "unused
    parameters" error at the second step) and FSDP would reduce them for nothing; frozen, every trained parameter
    gets a gradient at every step and the result is unchanged."""
    last = len(dit.transformer_blocks) - 1
    prefixes = tuple(f"transformer_blocks.{last}.{name}." for name in ("attn.to_add_out", "txt_mlp"))
    frozen = [name for name, p in dit.named_parameters() if name.startswith(prefixes) and p.requires_grad]
    for name in frozen:
        dit.get_parameter(name).requires_grad_(False)
    return frozen


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
