"""`qistudio generate --text-encoder FILE`: the files' text encoder checked against the model's family before any
weight is read (only the files' headers are).

Qwen-Image, Edit and 2512 read prompts with Qwen2.5-VL (llama.cpp's GGUF, with its mmproj for edits, or
safetensors); Qwen-Image 2.1 with Qwen3-VL (safetensors). The files replace the model's own text encoder, the second
of its ModelConfigs in both families, so a file of the other family would fail later, deep in loading or with
text states of the wrong width: it is refused here, naming the file and what would fit.
"""

from __future__ import annotations


def text_encoder_problem(files: list[str], qwen21: bool) -> str | None:
    """None when `files` hold the text encoder the model's family reads, else the message saying why not."""
    from ..weights.errors import CheckpointError
    from ..weights.formats import TEXT_ENCODER, detect_layout
    from ..weights.formats21 import QWEN3_VL_LAYOUT
    from ..weights.quantized_source import open_source

    shown = " ".join(files)
    try:
        source = open_source(files)
        try:
            layout = detect_layout(source.keys(), shown)
        finally:
            source.close()
    except (CheckpointError, OSError, ValueError) as e:
        return f"--text-encoder {shown}: {e}"
    if layout.kind != TEXT_ENCODER:
        return f"--text-encoder {shown}: holds a {layout.name}, not a text encoder"
    is_qwen3_vl = layout.name == QWEN3_VL_LAYOUT
    if qwen21 and not is_qwen3_vl:
        return (f"--text-encoder {shown}: a {layout.name} text encoder, which Qwen-Image, Edit and 2512 use; "
                "Qwen-Image 2.1 reads prompts with Qwen3-VL: give its text encoder's safetensors, or leave "
                "--text-encoder out")
    if is_qwen3_vl and not qwen21:
        return (f"--text-encoder {shown}: Qwen3-VL, Qwen-Image 2.1's text encoder; this model reads prompts with "
                "Qwen2.5-VL (llama.cpp's GGUF with its mmproj, or safetensors)")
    return None


def check_text_encoder(settings: dict, error) -> None:
    """error(message) when settings["text_encoder"]'s files do not hold the model's family of text encoder."""
    from .generate21 import is_qwen21_model

    qwen21 = not settings.get("demo") and is_qwen21_model(settings.get("model"))
    problem = text_encoder_problem(settings["text_encoder"], qwen21)
    if problem:
        error(problem)
