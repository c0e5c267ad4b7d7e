"""What the loaded ControlNets add to the target image tokens after each DiT block, step by step.

Design note. Two families share one input type (`ControlNetInput`) and one hook point (after each DiT block, on
the target tokens only, times the input's scale; several inputs add up):
- Blockwise (DiffSynth-Studio): the control features are projected once per call; after DiT block i, ControlNet
  block i reads the current target tokens and the projection and returns the residual. Window: `active`.
- InstantX (diffusers' QwenImageControlNetModel): once per step, before the DiT runs, its own DiT blocks read the
  noisy target tokens plus the control features, the positive prompt, the timestep and RoPE tables laid out as
  diffusers does (target grid at frame 0, then text); DiT block i then adds sample `i // ceil(DiT blocks /
  samples)`. As in diffusers' pipelines it runs on the positive prompt only and both guidance branches add the
  same samples. Window: `active_span` (diffusers' rule). Edit or context images are not shown to it (diffusers'
  ControlNet pipelines have none); EliGen's structured text is, with its mask.
"""

from __future__ import annotations

import torch

from ..models.dit import BlockHook
from ..models.instantx_controlnet import QwenImageInstantXControlNet, block_sample_index
from ..models.text_encoder import TextStates
from ..ops.rope import ImageGrid
from .control import ControlNetInput
from .sequence import build_sequence


class ControlResiduals:
    """The ControlNet inputs of one call, ready to give each denoising step its block hook."""

    def __init__(self, controls: list[tuple[ControlNetInput, torch.Tensor]], controlnets: list, target: ImageGrid,
                 positive: TextStates, num_steps: int, num_dit_layers: int,
                 entity_token_masks: torch.Tensor | None = None, project_with_grad: bool = False):
        """controls: (input, patchified control features (1, N, 64|68)); positive: the prompt states (B rows).
        project_with_grad: the projection joins the autograd graph (training a Blockwise ControlNet)."""
        self.num_target, self.num_steps, self.num_dit_layers = target.num_tokens, num_steps, num_dit_layers
        self.blockwise, self.instantx = [], []
        with torch.set_grad_enabled(project_with_grad):  # each Blockwise map is projected once per call
            for control, features in controls:
                net = controlnets[control.controlnet_id]
                if isinstance(net, QwenImageInstantXControlNet):
                    self.instantx.append((control, net, features))
                else:
                    self.blockwise.append((control, net, net.project(features)))
        self.sequences = {}  # per RoPE split: the InstantX ControlNets' [target, text] layout
        for _, net, _ in self.instantx:
            axes = tuple(net.config.axes_dim)
            if axes not in self.sequences:
                self.sequences[axes] = build_sequence(target, [[] for _ in positive.lengths], positive, axes,
                                                      entity_token_masks=entity_token_masks)

    def _instantx_samples(self, step: int, tokens: torch.Tensor, timestep: torch.Tensor):
        """(input, its samples) for the InstantX inputs active at `step`; tokens (B, N, 64), timestep (B,)."""
        active = []
        for control, net, features in self.instantx:
            if control.active_span(step, self.num_steps):
                seq = self.sequences[tuple(net.config.axes_dim)]
                samples = net.block_samples(tokens, features.expand(tokens.shape[0], -1, -1), seq.text.states,
                                            timestep, seq.rotary, seq.text_lengths, seq.attention_mask)
                active.append((control, samples))
        return active

    def hook(self, step: int, tokens: torch.Tensor, timestep: torch.Tensor) -> BlockHook | None:
        """The DiT's block hook at `step` (None when no input is active); runs the InstantX ControlNets now."""
        blockwise = [(c, net, proj) for c, net, proj in self.blockwise if c.active(step, self.num_steps)]
        instantx = self._instantx_samples(step, tokens, timestep)
        if not blockwise and not instantx:
            return None
        n = self.num_target

        def hook(index: int, image: torch.Tensor) -> torch.Tensor:
            own = image[:, :n]  # (rows, N, D): B rows, or 2B with both guidance branches in one batch
            terms = [c.scale * net.residual(index, own, proj.expand(own.shape[0], -1, -1))
                     for c, net, proj in blockwise]
            for c, samples in instantx:
                sample = samples[block_sample_index(index, self.num_dit_layers, len(samples))]
                terms.append((sample * c.scale).to(own.dtype).repeat(own.shape[0] // sample.shape[0], 1, 1))
            residual = sum(terms)
            return torch.cat([own + residual, image[:, n:]], dim=1) if image.shape[1] > n else own + residual

        return hook
