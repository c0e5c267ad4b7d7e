"""The benchmark helpers the GPU run depends on, checked on the CPU (runs in CI; fast): the timing discipline, the
FlashAttention 4 entry wired into diffusers' attention dispatch, and the report's caption."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import peers
from bench.pair import TINY, dit_call, reference_dit
from bench.report import caption, markdown_table
from bench.timing import Timing, interleaved, measure


def test_interleaved_warms_up_then_alternates_rounds():
    calls = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = interleaved(cases, runs=3, warmup=2, calls=2, before=lambda name: calls.append(f"set {name}"),
                          device="cpu")
    warm, timed = calls[:12], calls[12:]
    assert warm == ["set a", "a", "a", "set a", "a", "a", "set b", "b", "b", "set b", "b", "b"]
    assert timed == ["set a", "a", "a", "set b", "b", "b"] * 3  # one run of each per round, in turn
    assert all(len(t.samples) == 3 and t.low <= t.median <= t.high for t in timings.values())


def test_timing_text_gives_median_and_spread():
    t = Timing((0.5, 0.25, 0.75, 0.3, 0.4))
    assert t.text() == "0.400 s (0.250-0.750, n=5)"
    assert t.text("ms", 1) == "400.0 ms (250.0-750.0, n=5)"
    assert measure(lambda: None, runs=5, device="cpu").median >= 0


def test_flash4_entry_reaches_diffusers_attention(monkeypatch):
    """diffusers' flash_4_hub backend, given our kernel, calls it with (B, S, H, D) tensors for every attention, eager
    and traced whole (fullgraph): a stand-in kernel (SDPA, counting calls) gives diffusers' native output."""
    from qistudio.ops import flash4

    seen = []

    def stand_in(query, key, value, key_lengths=None):
        seen.append(query.shape)
        return F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                              value.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setattr(flash4, "flash4_attention", stand_in)
    monkeypatch.setattr(peers, "diffusers_backend_problem", lambda name: None)
    model = reference_dit(TINY)
    call = dit_call(TINY, 2, seed=1)
    peers.set_diffusers_backend(model, "native")
    expected = call.diffusers(model)
    peers.set_diffusers_backend(model, "flash4")
    try:
        assert torch.allclose(call.diffusers(model), expected, atol=1e-5)
        heads, head_dim = TINY.dit["num_attention_heads"], TINY.dit["attention_head_dim"]
        tokens = TINY.grid[0] * TINY.grid[1] + TINY.text_len
        assert seen and all(shape == (2, tokens, heads, head_dim) for shape in seen)
        assert len(seen) == TINY.dit["num_layers"]
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        assert torch.allclose(call.diffusers(model), expected, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_unknown_or_missing_backends_say_why():
    assert "not a backend" in peers.diffusers_backend_problem("nonsense")
    runnable, skipped = peers.diffusers_backends(eager=True)
    assert "native" in runnable and "flex" in skipped  # eager flex is its unfused reference form


def test_caption_names_command_card_and_software():
    text = caption("what", "how")
    assert "Command: `python " in text and "Card: " in text and "torch " in text and "Timing: how." in text
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
