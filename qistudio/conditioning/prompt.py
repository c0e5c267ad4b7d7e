"""Prompts -> text-encoder states: apply the template, encode, drop the template's system prefix, re-pad."""

from __future__ import annotations

import warnings

import torch

from ..models.text_encoder import T2I_TEMPLATE, QwenImageTextEncoder, TextStates, template_prefix_length


def encode_prompts(
    text_encoder: QwenImageTextEncoder,
    tokenizer,
    prompts: list[str],
    device,
    dtype: torch.dtype,
    template: str = T2I_TEMPLATE,
    max_length: int | None = None,
) -> TextStates:
    """(B, L, D) states of the prompts' own tokens (template prefix dropped), right-padded with zeros.

    Prompts longer than `max_length` tokens (default: the encoder's 1024) are truncated, with a warning.
    """
    max_length = max_length or text_encoder.max_length
    drop = template_prefix_length(tokenizer, template)
    texts = [template.format(p) for p in prompts]
    full = tokenizer(texts, padding=False, truncation=False)["input_ids"]
    too_long = [i for i, ids in enumerate(full) if len(ids) - drop > max_length]
    if too_long:
        warnings.warn(
            f"prompt {too_long[0]} is {len(full[too_long[0]]) - drop} tokens long; the text encoder takes at most "
            f"{max_length}, so it is truncated to {max_length} tokens",
            stacklevel=3,
        )
    tokens = tokenizer(texts, max_length=max_length + drop, padding=True, truncation=True, return_tensors="pt")
    input_ids = tokens["input_ids"].to(device)
    attention_mask = tokens["attention_mask"].to(device)
    with torch.no_grad():
        hidden = text_encoder(input_ids, attention_mask)  # (B, S, D)
    return trim_template(hidden, attention_mask, drop, dtype)


def trim_template(hidden: torch.Tensor, attention_mask: torch.Tensor, drop: int, dtype: torch.dtype) -> TextStates:
    """Keep each row's valid tokens after the template prefix, right-padded with zeros: (B, L, D)."""
    # Select by the mask, so a tokenizer that pads on the left works too.
    rows = [hidden[i][attention_mask[i].bool()][drop:] for i in range(hidden.shape[0])]
    states = hidden.new_zeros(len(rows), max(r.shape[0] for r in rows), hidden.shape[-1])
    for i, row in enumerate(rows):
        states[i, : row.shape[0]] = row
    return TextStates(states.to(dtype), [r.shape[0] for r in rows])


def concat_text_states(parts: list[TextStates]) -> TextStates:
    """Stack several batches of states along the batch axis, padding to the longest."""
    width = max(p.states.shape[1] for p in parts)
    padded = [torch.nn.functional.pad(p.states, (0, 0, 0, width - p.states.shape[1])) for p in parts]
    segments = None
    if any(p.segments is not None for p in parts):
        segments = [row for p in parts for row in p.row_segments()]
    return TextStates(torch.cat(padded), [n for p in parts for n in p.lengths], segments)
