"""The sample cache (--cache): training from it equals training without it, the encoders are released and never
run on a warm cache, a changed prompt, image or setting is encoded again, samples round-trip field by field, and
several processes split the encoding."""

import dataclasses
import json
import threading

import pytest
import torch
from PIL import Image

from qistudio.conditioning.control import ControlNetInput
from qistudio.conditioning.sequence import DiTSequence
from qistudio.models.text_encoder import TextStates
from qistudio.ops.rope import Rotary
from qistudio.ops.split_attention import SplitMask
from qistudio.training import Trainer
from qistudio.training.adapters import lora_pairs
from qistudio.training.cache import (INDEX, TRAINING_ONLY, build_cache, encoding_fingerprint, entry_path, read_entry, row_keys,
                                     write_entry)
from qistudio.training.data import ImageDataset
from qistudio.training.encode import EncodedSample, encode_sample
from test_training import base, data, fresh, make_config  # noqa: F401 (fixtures)
from test_training_data import write_dataset, write_image

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: torch.cat([down.flatten(), up.flatten()]).detach().clone()
            for name, (down, up, _) in lora_pairs(trainer.dit).items()}


class Forbidden(RuntimeError):
    pass


def forbid_calls(*modules):
    """Forward pre-hooks on every submodule that raise: proof a model is not run (returns the handles)."""
    def refuse(module, args):
        raise Forbidden(f"{type(module).__name__} ran")

    return [m.register_forward_pre_hook(refuse) for model in modules for m in model.modules()]


def assert_same_samples(ours: EncodedSample, expected: EncodedSample):
    assert torch.equal(ours.latents, expected.latents)
    assert torch.equal(ours.sequence.text.states, expected.sequence.text.states)
    assert ours.sequence.text.lengths == expected.sequence.text.lengths
    assert torch.equal(ours.sequence.rotary.image, expected.sequence.rotary.image)
    assert torch.equal(ours.sequence.rotary.text, expected.sequence.rotary.text)


def test_training_from_the_cache_equals_training_without_it(base, tiny_repo, data, tmp_path):
    options = dict(max_steps=4, num_epochs=2, data=dict(repeat=2), gradient_accumulation_steps=2, learning_rate=5e-3)
    plain = Trainer(make_config(tiny_repo, data, tmp_path / "plain", **options), components=fresh(base),
                    progress_bar=False)
    plain.run()
    cache = tmp_path / "cache"
    cold = Trainer(make_config(tiny_repo, data, tmp_path / "cold", cache_dir=str(cache), **options),
                   components=fresh(base), progress_bar=False)
    cold.run()
    assert (cold.cache_report.encoded, cold.cache_report.reused) == (3, 0)  # 3 rows, each encoded once
    assert cold.components.text_encoder is None and cold.components.vae is None  # released for training

    handles = forbid_calls(base.text_encoder, base.vae)
    try:
        # DataLoader workers read the entries (the worker count is not part of the key).
        warm_options = dict(options, data=dict(repeat=2, num_workers=2))
        warm = Trainer(make_config(tiny_repo, data, tmp_path / "warm", cache_dir=str(cache), **warm_options),
                       components=fresh(base), progress_bar=False)
        warm.run()
    finally:
        for handle in handles:
            handle.remove()
    assert (warm.cache_report.encoded, warm.cache_report.reused) == (0, 3)
    assert warm.components.text_encoder is None and warm.components.vae is None
    expected = [r.loss for r in plain.history]
    assert len(expected) == 4
    for run in (cold, warm):
        assert [r.loss for r in run.history] == pytest.approx(expected, rel=1e-6)
        weights = lora_weights(run)
        assert all(torch.allclose(weights[k], v, atol=1e-6) for k, v in lora_weights(plain).items())
    assert warm.evaluate([0, 1]) == pytest.approx(plain.evaluate([0, 1]), rel=1e-6)  # from the cache too
    index = json.loads((cache / INDEX).read_text())
    assert len(index["rows"]) == 3 and all(entry_path(cache, key).is_file() for key in index["rows"])


def test_a_changed_prompt_image_or_setting_is_encoded_again(base, tiny_repo, data, tmp_path):
    cache = tmp_path / "cache"

    def build(**overrides):
        trainer = Trainer(make_config(tiny_repo, data, tmp_path / "out", cache_dir=str(cache), max_steps=1,
                                      **overrides), components=fresh(base), progress_bar=False)
        trainer.run()
        return trainer

    build()
    rows = (data / "metadata.csv").read_text().splitlines()
    rows[2] = rows[2].replace("prompt 1", "a changed prompt")  # row 1 (after the header)
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    changed = build()
    assert (changed.cache_report.encoded, changed.cache_report.reused, changed.cache_report.removed) == (1, 2, 1)
    dataset = ImageDataset(changed.config.data)
    fresh_encoding = encode_sample(base, dataset[1], (), None, "cpu", torch.float32)
    assert_same_samples(read_entry(entry_path(cache, changed.cached.keys[1])), fresh_encoding)

    write_image(data / "img2.png", 40, 56, seed=99)  # same size, other pixels
    assert build().cache_report.encoded == 1
    assert build().cache_report.encoded == 0  # nothing changed
    assert build(lora_rank=8, learning_rate=1e-2).cache_report.encoded == 0  # training settings do not count
    config = make_config(tiny_repo, data, tmp_path / "out")
    assert encoding_fingerprint(base, dataclasses.replace(config, compile=True), "cpu", torch.float32) == \
        encoding_fingerprint(base, config, "cpu", torch.float32)  # nor does compiling the DiT
    assert TRAINING_ONLY <= {f.name for f in dataclasses.fields(config)}  # every name there is a setting
    assert build(data=dict(max_pixels=32 * 32)).cache_report.encoded == 3  # a size setting: every entry again


def test_encoded_samples_round_trip_field_by_field(base, tiny_repo, data, tmp_path):
    """Every field, nested dataclass and list survives (the EliGen mask, ControlNet inputs), and what cannot be
    stored is refused with the field's path."""
    sample = encode_sample(base, ImageDataset(make_config(tiny_repo, data, tmp_path).data)[0], (), None, "cpu",
                           torch.float32)
    mask = SplitMask(12, torch.rand(1, 5, 12) > 0.5, torch.ones(1, 5, 5, dtype=torch.bool))
    text = TextStates(torch.randn(1, 5, 8), [4], segments=[[1, 3]])
    sequence = DiTSequence(12, torch.randn(1, 6, 64), text, Rotary(torch.polar(torch.ones(18, 4), torch.rand(18, 4)),
                                                                   torch.polar(torch.ones(5, 4), torch.rand(5, 4))),
                           mask, torch.arange(18) >= 12)
    controls = [(ControlNetInput(scale=0.5, start=0.9, controlnet_id=1), torch.randn(1, 12, 68))]
    original = EncodedSample(sample.latents.to(torch.bfloat16), sequence, controls)
    path = tmp_path / "entry.safetensors"
    write_entry(path, original)
    loaded = read_entry(path)
    assert type(loaded) is EncodedSample and loaded.latents.dtype == torch.bfloat16
    assert torch.equal(loaded.latents, original.latents)
    seq = loaded.sequence
    assert seq.num_target_tokens == 12 and seq.text.lengths == [4] and seq.text.segments == [[1, 3]]
    assert torch.equal(seq.rotary.image, sequence.rotary.image) and seq.rotary.image.dtype == torch.complex64
    assert isinstance(seq.attention_mask, SplitMask) and seq.attention_mask.num_image == 12
    assert torch.equal(seq.attention_mask.text_to_image, mask.text_to_image)
    assert torch.equal(seq.condition_token_mask, sequence.condition_token_mask)
    (control, features), = loaded.controls
    assert control == ControlNetInput(scale=0.5, start=0.9, controlnet_id=1)
    assert torch.equal(features, controls[0][1])

    image_left_in = EncodedSample(sample.latents, sample.sequence, [(ControlNetInput(image=Image.new("RGB", (4, 4))),
                                                                     torch.zeros(1))])
    with pytest.raises(TypeError, match=r"sample\.controls\[0\]\[0\]\.image is a Image"):
        write_entry(tmp_path / "bad.safetensors", image_left_in)


class ProcessGroup:
    """accelerate's process facts for one of several threads standing in for processes; wait_for_everyone is a
    real barrier, so the protocol (list, wait, encode a share, wait, main finishes, wait) runs as it would."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, size, rank == 0
        self.wait_for_everyone = barrier.wait


def test_several_processes_share_the_encoding(base, tiny_repo, tmp_path):
    folder = tmp_path / "data"
    write_dataset(folder, sizes=((32, 32), (48, 32), (32, 48), (48, 48), (16, 32)))
    dataset = ImageDataset(make_config(tiny_repo, folder, tmp_path).data)
    config = make_config(tiny_repo, folder, tmp_path)
    fingerprint = encoding_fingerprint(base, config, torch.device("cpu"), torch.float32)
    barrier = threading.Barrier(2, timeout=60)
    encoded_by = {0: [], 1: []}
    results, errors = {}, []

    def process(rank):
        def encode(item):
            encoded_by[rank].append(item["prompt"])
            return encode_sample(base, item, (), None, "cpu", torch.float32)

        try:
            results[rank] = build_cache(tmp_path / "cache", dataset, fingerprint, encode,
                                        lambda rows: (dataset[r] for r in rows), ProcessGroup(rank, 2, barrier), False)
        except Exception as e:  # reported below, with the barrier broken so the other thread stops too
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(encoded_by[0] + encoded_by[1]) == sorted(row["prompt"] for row in dataset.rows)  # each once
    assert len(encoded_by[0]) == 3 and len(encoded_by[1]) == 2  # every other missing row
    cached, report = results[0]
    assert report.encoded == 5 and cached.keys == row_keys(dataset, fingerprint)
    for index in range(5):
        assert_same_samples(cached[index], encode_sample(base, dataset[index], (), None, "cpu", torch.float32))


@pytest.fixture(scope="module")
def variant_data(tmp_path_factory):
    from test_training_variants import write_variant_dataset

    return write_variant_dataset(tmp_path_factory.mktemp("variants"))


@pytest.mark.filterwarnings("ignore:.*Context_Control")  # the In-Context trigger note, tested elsewhere
@pytest.mark.parametrize("variant", ["edit", "context", "inpaint", "eligen"])
def test_every_variants_samples_train_alike_from_the_cache(base, tiny_repo, variant_data, tmp_path, monkeypatch,
                                                           variant):
    """Edit and context latents, ControlNet inputs with the Inpaint mask, EliGen's entity mask: all cached."""
    import qistudio.conditioning.edit as edit_module
    from test_control import write_controlnet
    from test_training_variants import FULL_CONTROLNET, VARIANTS, make_config as variant_config, with_controlnet

    monkeypatch.setattr(edit_module, "EDIT_LATENT_AREA", 64 * 64)
    net = write_controlnet(tmp_path / "inpaint.safetensors", inpaint=True, seed=1) if variant == "inpaint" else None
    options = dict(learning_rate=1e-2, **(FULL_CONTROLNET if variant == "inpaint" else {}))
    runs = []
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # without, cold, warm
        config = variant_config(tiny_repo, variant_data, tmp_path / "out", VARIANTS[variant],
                                cache_dir=None if cache is None else str(cache), **options)
        trainer = Trainer(config, components=with_controlnet(base, net), progress_bar=False)
        trainer.run()
        runs.append(trainer)
    assert (runs[1].cache_report.encoded, runs[2].cache_report.encoded) == (2, 0)
    for run in runs[1:]:
        assert [r.loss for r in run.history] == pytest.approx([r.loss for r in runs[0].history], rel=1e-6)
