"""The offline-built Qwen2.5 tokenizer loads in transformers and equals tiktoken over the same ranks."""

import base64
import json
import random
import unicodedata

import pytest

from qistudio.models.text_encoder import EDIT_TEMPLATE, T2I_TEMPLATE, template_prefix_length
from qistudio.tokenizer_build import (
    ADDED_TOKENS,
    QWEN2_REGEX,
    qwen_ranks_path,
    write_qwen25_tokenizer,
)

tiktoken = pytest.importorskip("tiktoken")
transformers = pytest.importorskip("transformers")

EXPECTED_ADDED = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
TEXTS = [
    "A cat sitting on a windowsill, watercolor.",
    "hello world",
    "  leading spaces and trailing spaces   ",
    "line one\nline two\r\n\n\n  indented\tTAB",
    "Prices: 12345 apples, 3.14159 pies, 1,000,000 dollars in 2025!",
    "一只橘猫坐在窗台上，水彩画风格。阳光透过窗户洒进来。",
    "混合 mixed 文本 text 123 和 emoji 😀👍🏽🇨🇳 ok",
    "Ünïcödé çàfé naïve résumé — “quotes” … ½ ²",
    "don't I'LL we've they'RE it's",
    "code: def f(x):\n    return x**2  # square\n",
    "=====  -----  .....  !!!???",
    "<|im_start|>user\nDraw <|image_pad|> a <tool_call>fox</tool_call><|im_end|>\n",
    "\u00a0non-breaking\u3000ideographic space",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ranks():
    lines = qwen_ranks_path().read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


@pytest.fixture(scope="module")
def reference(ranks):
    """tiktoken over the same ranks with Qwen2's regex and added tokens: the encoding Qwen2.5 was trained with."""
    return tiktoken.Encoding("qwen2.5", pat_str=QWEN2_REGEX, mergeable_ranks=ranks, special_tokens=EXPECTED_ADDED)


def reference_ids(reference, text):
    return reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def test_loads_as_qwen2_tokenizer_with_the_released_config(folder, tokenizer):
    assert type(tokenizer) is transformers.Qwen2Tokenizer
    assert len(tokenizer) == 151643 + 22 == 151665
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 131072
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert not list(folder.glob(".*.tmp"))  # no temporary file left behind


def test_ids_equal_tiktoken(folder, tokenizer, reference):
    direct = transformers.Qwen2Tokenizer.from_pretrained(folder)
    for text in TEXTS:
        expected = reference_ids(reference, text)
        assert tokenizer(text)["input_ids"] == expected, text  # add_special_tokens=True adds nothing: no BOS
        assert direct(text, add_special_tokens=False)["input_ids"] == expected, text
        assert tokenizer.decode(expected) == unicodedata.normalize("NFC", text)
    assert tokenizer("hello world")["input_ids"] == [14990, 1879]  # well-known Qwen ids
    assert len(tokenizer("2025")["input_ids"]) == 4  # Qwen2 splits digits one by one


def test_normalises_to_nfc(tokenizer, reference):
    decomposed = "cafe\u0301"  # e + combining acute
    assert tokenizer(decomposed)["input_ids"] == tokenizer("caf\u00e9")["input_ids"]
    assert tokenizer(decomposed)["input_ids"] == reference_ids(reference, decomposed)


def test_whole_vocabulary_encodes_like_tiktoken(tokenizer, reference, ranks):
    """Every regular token that is NFC UTF-8 text encodes as tiktoken does: the merge list loses nothing."""
    texts = []
    for token in ranks:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:  # a partial character: not reachable from text on its own
            continue
        if unicodedata.normalize("NFC", text) == text:
            texts.append(text)
    assert len(texts) > 140_000
    # The Rust backend and a plain loop: the same ids as tokenizer(texts) and tiktoken's batch, 3x faster.
    ours = [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    theirs = [reference.encode(text, allowed_special="all") for text in texts]
    mismatches = [text for text, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:10]


def test_random_repetitive_strings_encode_like_tiktoken(tokenizer, reference):
    """Runs of one character are where BPE tie-breaking could differ from tiktoken's; a seeded fuzz."""
    rng = random.Random(0)
    pieces = ["a", "aa", " ", "  ", "\n", "\t", "=", "-", "_", ".", "*", "#", "0", "9", "中", "😀", "é", "<|im_end|>"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 120))) for _ in range(5000)]
    ours = [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    mismatches = [text for text, ids in zip(texts, ours) if ids != reference_ids(reference, text)]
    assert not mismatches, mismatches[:10]


def test_added_tokens_have_qwen25_ids_and_are_not_split(tokenizer):
    assert ADDED_TOKENS == EXPECTED_ADDED
    for token, token_id in EXPECTED_ADDED.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"] == [64, token_id, 65]
    text = "<|im_start|>x<|im_end|><tool_call>"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == "x<tool_call>"


@pytest.mark.parametrize(
    ("template", "prefix", "length"),
    [
        (T2I_TEMPLATE, T2I_TEMPLATE.split("{}")[0], 34),
        # Edit: diffusers drops the 64 system tokens, up to and including "<|im_start|>user\n"
        (EDIT_TEMPLATE, EDIT_TEMPLATE.split("<|vision_start|>")[0], 64),
    ],
)
def test_template_prefix_lengths(tokenizer, template, prefix, length):
    prefix_ids = tokenizer(prefix)["input_ids"]
    assert len(prefix_ids) == length == template_prefix_length(tokenizer, template)  # computed, never hard-coded
    full_ids = tokenizer(template.format("a red fox in the snow"))["input_ids"]
    assert full_ids[:length] == prefix_ids  # the prompt never merges with the prefix


def test_edit_prefix_with_vision_placeholders_is_67(tokenizer):
    assert len(tokenizer(EDIT_TEMPLATE.split("{}")[0])["input_ids"]) == 67


def test_padding_a_batch(tokenizer, reference):
    prompts = ["a cat", "a much longer prompt about a cat on a windowsill"]
    batch = tokenizer(prompts, padding=True)
    short, long = (reference_ids(reference, prompt) for prompt in prompts)
    assert batch["input_ids"][1] == long
    assert batch["input_ids"][0] == short + [151643] * (len(long) - len(short))  # right-padded with pad token
    assert batch["attention_mask"][0] == [1] * len(short) + [0] * (len(long) - len(short))
    assert batch["attention_mask"][1] == [1] * len(long)


def test_raw_tokenizer_json_agrees(folder, tokenizer):
    """tokenizer.json alone (no transformers class) gives the same ids, so the two files cannot drift."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert raw.encode(text).ids == tokenizer(text)["input_ids"], text
