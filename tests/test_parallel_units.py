"""The parts of qistudio/parallel that need no second process: degrees and their errors (also through the CLI,
before anything loads), the token layout, mask blocks against the dense mask, the log-sum-exp merge, ring attention
on one rank against plain attention, and the pipeline under degrees of 1 against the plain pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import rel_err
from qistudio.cli.main import main
from qistudio.ops.attention import attention
from qistudio.ops.split_attention import SplitMask
from qistudio.parallel import Degrees, ParallelConfigError, parse_degrees, resolve_degrees
from qistudio.parallel.layout import TokenLayout
from qistudio.parallel.masks import IMAGE, TEXT, JointMask
from qistudio.parallel.ring import merge, partial_attention, ring_attention


def test_degrees_are_parsed_and_refused_with_one_message():
    assert parse_degrees("cfg=2, ulysses=2") == {"cfg": 2, "ulysses": 2}
    assert parse_degrees("auto") == "auto"
    for text, words in [("cfg=2,cfg=2", "cfg is given twice"), ("heads=2", "NAME one of data, cfg, ulysses, ring"),
                        ("cfg=0", "cfg must be a whole number >= 1, got '0'"), ("ring=x", "got 'x'"),
                        (" , ", "give degrees")]:
        with pytest.raises(ParallelConfigError, match=words):
            parse_degrees(text)


def test_degrees_resolve_against_the_world_and_the_heads():
    assert resolve_degrees({"cfg": 2, "ulysses": 2}, 4) == Degrees(cfg=2, ulysses=2)
    with pytest.raises(ParallelConfigError, match=r"cfg=2,ring=2 makes 4 rank\(s\) .* but 8 process\(es\) run"):
        resolve_degrees({"cfg": 2, "ring": 2}, 8)
    with pytest.raises(ParallelConfigError, match="ulysses=5 does not divide the model's 24 attention heads; use one "
                                                  "of 1, 2, 3, 4, 6, 8, 12, 24"):
        resolve_degrees({"ulysses": 5}, 5)
    with pytest.raises(ParallelConfigError, match="cfg is 1 or 2"):
        resolve_degrees({"cfg": 4}, 4)
    with pytest.raises(ParallelConfigError, match="unknown parallel degree 'tensor'"):
        resolve_degrees({"tensor": 2}, 2)
    # auto: cfg where the count is even, then Ulysses as far as it divides the heads, ring for the rest
    assert resolve_degrees("auto", 8) == Degrees(cfg=2, ulysses=4)
    assert resolve_degrees("auto", 32) == Degrees(cfg=2, ulysses=8, ring=2)
    assert resolve_degrees(None, 5) == Degrees(ring=5)
    assert resolve_degrees("auto", 4, num_heads=2) == Degrees(cfg=2, ulysses=2)
    assert resolve_degrees("auto", 1) == Degrees()


@pytest.mark.parametrize("flag, words", [
    ("cfg=3", "--parallel: cfg=3: guidance has two branches, so cfg is 1 or 2"),
    ("ulysses=4", "ulysses=4 does not divide the model's 2 attention heads"),
    ("ring=two", "ring must be a whole number >= 1, got 'two'"),
])
def test_cli_refuses_bad_degrees_before_anything_loads(flag, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: a demo load would build one there
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a fox", "--demo", "--device", "cpu", "-o", str(tmp_path / "x.png"), "--parallel", flag])
    assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "qistudio").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("model, flag, words", [
    ("Qwen/Qwen-Image-2.1", "ulysses=3", "ulysses=3 does not divide the model's 32 attention heads"),
    ("Qwen/Qwen-Image", "ulysses=32", "ulysses=32 does not divide the model's 24 attention heads"),
])
def test_cli_checks_a_hub_models_heads_before_its_download(model, flag, words, tmp_path, monkeypatch, capsys):
    """A hub id not yet downloaded: the released model's head count (2.1: 32; once Qwen-Image's 24 for every id)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a fox", "--model", model, "--device", "cpu", "-o", str(tmp_path / "x.png"),
              "--parallel", flag])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("num_image", [1, 2, 7, 15, 16])
@pytest.mark.parametrize("ulysses, ring", [(1, 1), (2, 1), (1, 3), (2, 2), (4, 1)])
def test_token_layout_covers_every_token_once(num_image, ulysses, ring):
    layouts = [TokenLayout(num_image, ulysses, ring, rank) for rank in range(ulysses * ring)]
    tokens = torch.arange(num_image)
    held = torch.cat([layout.local(tokens, 0, value=-1) for layout in layouts])
    assert held[:num_image].tolist() == tokens.tolist() and (held[num_image:] == -1).all()
    layout = layouts[0]
    valid = [layout.valid_in_ring_chunk(j) for j in range(ring)]
    assert sum(valid) == num_image and all(v == layout.ring_chunk for v in valid[: num_image // layout.ring_chunk])


def _eligen_mask(batch=2, num_image=10, length=6, seed=0) -> SplitMask:
    g = torch.Generator().manual_seed(seed)
    text_to_image = torch.rand(batch, length, num_image, generator=g) > 0.4
    text_to_text = torch.rand(batch, length, length, generator=g) > 0.3
    text_to_image[1, -2:], text_to_text[1, -2:], text_to_text[1, :, -2:] = False, False, False  # padding
    return SplitMask(num_image, text_to_image, text_to_text)


def test_mask_blocks_are_the_dense_mask_sliced():
    mask = _eligen_mask()
    dense = mask.dense()  # (B, 1, S, S)
    key_mask = torch.rand(2, 1, 1, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    lengths = [6, 4]
    text_valid = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    for joint, full, text_lengths in [(JointMask(mask, 10, None, "cpu"), dense, None),
                                      (JointMask(key_mask, 10, None, "cpu"), key_mask.expand(2, 1, 16, 16), None),
                                      (JointMask(None, 10, lengths, "cpu"), None, lengths)]:
        for q_part, q_index, k_part, k_index in [(IMAGE, torch.tensor([0, 3, 9]), IMAGE, torch.tensor([1, 2, 8, 9])),
                                                 (IMAGE, torch.arange(4, 8), TEXT, torch.arange(6)),
                                                 (TEXT, torch.arange(6), IMAGE, torch.arange(5)),
                                                 (TEXT, torch.arange(6), TEXT, torch.tensor([0, 5]))]:
            block = joint.allowed(q_part, q_index, k_part, k_index)
            if full is None:  # text lengths only: text keys are limited, image keys all allowed
                expected = text_valid[:, None, None, k_index] if k_part == TEXT else None
                assert (block is None) == (expected is None)
                if expected is not None:
                    assert torch.equal(block.expand(2, 1, len(q_index), -1),
                                       expected.expand(2, 1, len(q_index), -1))
                continue
            rows = q_index if q_part == IMAGE else q_index + 10
            cols = k_index if k_part == IMAGE else k_index + 10
            expected = full[:, :, rows][..., cols]
            got = torch.ones_like(expected) if block is None else block.expand_as(expected)
            assert torch.equal(got, expected), (q_part, k_part)


def test_partial_attentions_merge_into_one_softmax():
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))  # (B, H, S, D)
    allowed = torch.rand(2, 1, 5, 5, generator=g) > 0.5
    allowed[0, 0, 1] = False  # a row that sees nothing at all
    whole = None
    for part in (slice(0, 2), slice(2, 3), slice(3, 5)):
        whole = merge(whole, partial_attention(query, key[:, :, part], value[:, :, part], allowed[..., part]))
    out, lse = whole
    seen = allowed.expand(2, 3, 5, 5).any(-1)
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                                 attn_mask=allowed | ~allowed.any(-1, keepdim=True))
    assert rel_err(out[seen], reference[seen]) < 1e-6
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen])) and torch.isinf(lse[~seen]).all()


@pytest.mark.parametrize("kind", ["lengths", "eligen", "key_mask"])
def test_ring_attention_on_one_rank_equals_attention(kind):
    """The ring's bookkeeping (padding sliced off, masks read per block, text keys per row) without a peer: the
    whole joint sequence, from the padded image chunk, equals the plain attention call."""
    g = torch.Generator().manual_seed(2)
    batch, num_image, length, heads, dim = 2, 10, 6, 2, 8
    layout = TokenLayout(num_image, ulysses=1, ring=1, sequence_rank=0)
    query, key, value = (torch.randn(batch, num_image + length, heads, dim, generator=g) for _ in range(3))
    lengths, mask = None, None
    if kind == "lengths":
        lengths = [6, 3]
    elif kind == "eligen":
        mask = _eligen_mask(batch, num_image, length)
    else:
        mask = torch.rand(batch, 1, 1, num_image + length, generator=g) > 0.3
    expected = attention(query, key, value, key_lengths=None if lengths is None else [num_image + n for n in lengths],
                         mask=mask)
    image = torch.stack([layout.pad(t[:, :num_image], 1) for t in (query, key, value)])
    text = tuple(t[:, num_image:] for t in (query, key, value))
    image_out, text_out = ring_attention(image, text, layout, JointMask(mask, num_image, lengths, "cpu"), None, 0)
    got = torch.cat([image_out[:, :num_image], text_out], dim=1)
    if kind == "eligen":  # text padding rows see nothing: their output is never read (split attention differs)
        keep = torch.cat([torch.ones(batch, num_image, dtype=torch.bool), mask.text_to_text.any(-1)], dim=1)
        got, expected = got[keep], expected[keep]
    assert rel_err(got, expected) < 1e-6


@pytest.fixture
def one_rank(tiny_pipe):
    """tiny_pipe under degrees of 1 (a process group of one, in memory); both undone after."""
    yield tiny_pipe
    tiny_pipe.parallel = None
    if dist.is_initialized():
        dist.destroy_process_group()


def test_degrees_of_one_give_the_plain_pipeline(one_rank):
    call = dict(prompt="a red fox", negative_prompt="blurry", height=48, width=80, num_inference_steps=2, seed=1,
                output_type="latent", progress_bar_cmd=lambda steps: steps)
    plain = one_rank(**call)
    assert one_rank.enable_parallelism() == Degrees()
    assert torch.equal(one_rank(**call), plain)
    image = one_rank(**{**call, "output_type": "pil"})  # rank 0 of one: the image itself
    assert image.size == (80, 48)


def test_python_dash_m_runs_the_command():
    """`python -m qistudio` (as `torchrun ... -m qistudio generate ...` starts each rank) is the qistudio command."""
    import subprocess
    import sys

    from qistudio import __version__

    done = subprocess.run([sys.executable, "-m", "qistudio", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"qistudio {__version__}"


@pytest.fixture
def fake_two_ranks():
    """A process group of two in this one process (torch's fake backend: collectives return at once, their data
    meaningless): enough to see in what order a rank issues and waits for its collectives."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _recorded_forward(degrees: Degrees) -> list[str]:
    """The events of block 0's attention in one ShardedDiT forward over a tiny DiT: its q/k/v projections
    finishing, and the collectives issued and waited for, in the order they happened, up to block 0's MLP."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qistudio.demo import DEMO_DIT
    from qistudio.models.dit import QwenImageDiT
    from qistudio.ops.rope import ImageGrid, qwen_rotary
    from qistudio.parallel.mesh import build_mesh
    from qistudio.parallel.shard import ShardedDiT

    torch.manual_seed(0)
    dit = QwenImageDiT(DEMO_DIT).eval()
    events: list[str] = []
    names = {"all_to_all_single": "all-to-all", "all_gather_into_tensor": "all-gather", "wait_tensor": "wait",
             "_scaled_dot_product": "attention"}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            events.extend(word for name, word in names.items() if name in str(func))
            return func(*args, **(kwargs or {}))

    block = dit.transformer_blocks[0]
    hooks = [getattr(block.attn, name).register_forward_hook(lambda m, a, o, name=name: events.append(name))
             for name in ("to_q", "to_k", "to_v")]
    hooks.append(block.img_mlp.register_forward_pre_hook(lambda m, a: events.append("mlp")))
    text_length, (h, w) = 5, (4, 6)
    rotary = qwen_rotary([ImageGrid(0, h, w)], text_length, axes_dim=DEMO_DIT.axes_dim)
    with torch.no_grad(), Record():
        ShardedDiT(dit, build_mesh(degrees, torch.device("cpu")))(
            torch.randn(1, h * w, DEMO_DIT.in_channels), torch.randn(1, text_length, DEMO_DIT.text_dim),
            torch.tensor([0.5]), rotary, [text_length])
    for hook in hooks:
        hook.remove()
    return events[events.index("to_q") : events.index("mlp")]


def test_ulysses_sends_each_of_q_k_v_as_it_is_made(fake_two_ranks):
    """Under Ulysses, q's all-to-all is issued before k is projected and k's before v is; all three are waited for
    only after v's is issued, right before the attention; then the image output's all-to-all and the text heads'
    gather are both issued before either is waited for."""
    events = _recorded_forward(Degrees(ulysses=2))
    assert events == ["to_q", "all-to-all", "to_k", "all-to-all", "to_v", "all-to-all", "wait", "wait", "wait",
                      "attention", "all-to-all", "all-gather", "wait", "wait"]


def _collective_bytes(dit, degrees: Degrees = Degrees(ulysses=2)) -> list[tuple[str, int]]:
    """(collective, bytes sent) of every all-to-all, all-gather and ring pass of one ShardedDiT forward of `dit`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qistudio.demo import DEMO_DIT
    from qistudio.ops.rope import ImageGrid, qwen_rotary
    from qistudio.parallel.mesh import build_mesh
    from qistudio.parallel.shard import ShardedDiT

    sent: list[tuple[str, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for name in ("all_to_all_single", "all_gather_into_tensor", "permute_tensor", "_c10d_functional.send"):
                if name in str(func):
                    sent.append((name, args[0].numel() * args[0].element_size()))
            return func(*args, **(kwargs or {}))

    text_length, (h, w) = 5, (4, 6)
    rotary = qwen_rotary([ImageGrid(0, h, w)], text_length, axes_dim=DEMO_DIT.axes_dim)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, h * w, DEMO_DIT.in_channels, generator=generator)
    text = torch.randn(2, text_length, DEMO_DIT.text_dim, generator=generator)
    with torch.no_grad(), Record():
        ShardedDiT(dit, build_mesh(degrees, torch.device("cpu")))(image, text, torch.tensor([0.5, 0.5]), rotary,
                                                                  [text_length, 3])
    return sent


def test_ulysses_fp8_attention_sends_half_the_bytes(fake_two_ranks):
    """Under FP8 attention each of Ulysses' all-to-alls (q, k, v and the output back) and the text heads' gather
    moves float8 bytes: half of what the same forward in bf16 moves, collective for collective."""
    from qistudio.demo import DEMO_DIT
    from qistudio.models.dit import QwenImageDiT
    from qistudio.ops.attention import set_fp8_attention
    from qistudio.ops.fp8_attention import fp8_attention_reference

    torch.manual_seed(0)
    dit = QwenImageDiT(DEMO_DIT).eval().to(torch.bfloat16)
    plain = _collective_bytes(dit)
    set_fp8_attention(dit, True)
    with fp8_attention_reference():
        fp8 = _collective_bytes(dit)
    per_block = ["all_to_all_single"] * 4 + ["all_gather_into_tensor"]  # q, k, v, output; text heads
    assert [name for name, _ in plain] == per_block * DEMO_DIT.num_layers + ["all_gather_into_tensor"]
    assert [name for name, _ in fp8] == [name for name, _ in plain]
    blocks = len(per_block) * DEMO_DIT.num_layers  # the last gather (the DiT's output) stays in the compute dtype
    assert all(2 * fp8_bytes == plain_bytes for (_, fp8_bytes), (_, plain_bytes) in zip(fp8[:blocks], plain))


def test_ring_layouts_keep_compute_dtype_attention_under_fp8(fake_two_ranks):
    """Ring attention has no FP8 form: under FP8 attention a ring layout moves what it moves without it (bf16),
    and the DiT's modules keep asking for FP8 attention (a later Ulysses layout still gets it)."""
    from qistudio.demo import DEMO_DIT
    from qistudio.models.dit import QwenImageDiT
    from qistudio.ops.attention import set_fp8_attention
    from qistudio.ops.fp8_attention import fp8_attention_reference

    torch.manual_seed(0)
    dit = QwenImageDiT(DEMO_DIT).eval().to(torch.bfloat16)
    plain = _collective_bytes(dit, Degrees(ring=2))
    set_fp8_attention(dit, True)
    with fp8_attention_reference():
        assert _collective_bytes(dit, Degrees(ring=2)) == plain and len(plain) > 1
    assert all(block.attn.fp8_attention for block in dit.transformer_blocks)


def test_qwen21_takes_ring_and_refuses_degrees_that_cannot_run_before_any_process_group(monkeypatch):
    """Qwen-Image 2.1 (32 heads) runs ring (parallel/qwen21.py): ring alone, with cfg, with Ulysses, and where "auto"
    picks it (Ulysses does not divide the heads) resolve as for any model, with no check of 2.1's own; degrees that
    cannot run (ulysses=3 of 32 heads, beside ring) are still one ParallelConfigError before joining a process
    group, naming the value and what would run."""
    from qistudio.parallel import degrees
    from qistudio.parallel.runtime import enable_parallelism

    assert not hasattr(degrees, "check_qwen21_degrees")  # the 2.1 pipeline and CLI check what every model checks
    assert resolve_degrees({"ring": 2}, 2, 32) == Degrees(ring=2)
    assert resolve_degrees({"cfg": 2, "ring": 2}, 4, 32) == Degrees(cfg=2, ring=2)
    assert resolve_degrees({"ulysses": 2, "ring": 2}, 4, 32) == Degrees(ulysses=2, ring=2)
    assert resolve_degrees("auto", 3, 32) == Degrees(ring=3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ParallelConfigError, match=r"^ulysses=3 does not divide the model's 32 attention heads; use one "
                                                  r"of 1, 2, 4, 8, 16, 32 and ring for the rest \(ring takes any "
                                                  r"count\)$"):
        enable_parallelism("cpu", 32, {"ulysses": 3, "ring": 2})
    assert not dist.is_initialized()


@pytest.mark.parametrize("prefix_rows", [1, 2])
def test_qwen21_ring_attention_on_one_rank_equals_prefix_attention(prefix_rows):
    """The 2.1 ring's bookkeeping without a peer: a ring chunk whose last token is padding (7 target tokens over two
    Ulysses ranks: 8 held), the prefix as one more partial (shared by the two rows, or one per row) merged by
    log-sum-exp, equals the one-process attention over [prefix; target] for every valid token; the padding key
    (filled with large values) changes nothing."""
    from qistudio.ops.attention import prefix_attention
    from qistudio.parallel.qwen21 import ring_prefix_attention

    g = torch.Generator().manual_seed(3)
    batch, num_target, length, heads, dim = 2, 7, 5, 2, 8
    layout = TokenLayout(num_target, ulysses=2, ring=1, sequence_rank=0)
    assert layout.ring_chunk == 8 and layout.valid_in_ring_chunk(0) == 7
    query, key, value = (torch.randn(batch, layout.ring_chunk, heads, dim, generator=g) for _ in range(3))
    key[:, num_target:], value[:, num_target:] = 30.0, 30.0  # padding: never a key
    prefix_key, prefix_value = (torch.randn(prefix_rows, length, heads, dim, generator=g) for _ in range(2))
    expected = prefix_attention(query[:, :num_target], key[:, :num_target], value[:, :num_target], prefix_key,
                                prefix_value)
    got = ring_prefix_attention(query, torch.stack([key, value]), (prefix_key, prefix_value), layout, None, 0)
    assert got.shape == query.shape and rel_err(got[:, :num_target], expected) < 1e-6
