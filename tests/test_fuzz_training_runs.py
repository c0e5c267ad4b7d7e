"""Attacks on a training run: malformed rows on resume, NaN losses, non-finite settings, concurrent and stale runs
(the output lock). Each case asserts the behaviour a user gets (one clear error naming the problem), not merely that
nothing crashed."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

from qistudio.cli.main import main
from test_fuzz_training import cli_args
from test_training import base, fresh, make_config, run_killed_at  # noqa: F401 (fixtures)
from test_training_data import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def malformed_dataset(folder) -> None:
    write_dataset(folder, extra_rows=[{"image": "", "prompt": "empty"}, {"image": 7, "prompt": "number"},
                                      {"image": ["img0.png"], "prompt": "list"}], fmt="json")


def test_malformed_rows_are_skipped_and_counted_on_resume_too(base, tiny_repo, tmp_path):
    from qistudio.training import Trainer

    data = tmp_path / "data"
    malformed_dataset(data)
    options = dict(num_epochs=2, save_steps=2, metadata="metadata.json", data=dict(height=32, width=32))
    straight = Trainer(make_config(tiny_repo, data, tmp_path / "straight", **options), components=fresh(base),
                       progress_bar=False)
    straight.run()
    assert straight.progress.step == 12 and len(straight.progress.skipped) == 6  # 3 bad rows x 2 epochs
    assert {s["reason"] for s in straight.progress.skipped} == {
        "its image cell is empty", "its image cell must be a file path, got 7",
        "its image cell holds a list (['img0.png']); image takes one file path"}

    config = make_config(tiny_repo, data, tmp_path / "killed", **options)
    run_killed_at(base, config, 9)
    resumed = Trainer(config, components=fresh(base), resume="latest", progress_bar=False)
    assert resumed.progress.step == 8
    resumed.run()
    assert resumed.progress.skipped == straight.progress.skipped


def test_a_dataset_with_no_usable_row_stops_with_the_skip_report(base, tiny_repo, tmp_path):
    from qistudio.training import Trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / "m.jsonl").write_text('{"image": "", "prompt": "a"}\n{"image": [1], "prompt": "b"}\n')
    config = make_config(tiny_repo, data, tmp_path / "out", metadata="m.jsonl")
    with pytest.raises(ValueError, match=r"(?s)no sample of a whole epoch could be used; skipped 2 sample\(s\) .*"
                       r"image cell is empty"):
        Trainer(config, components=fresh(base), progress_bar=False).run()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_nan_in_the_models_stops_at_the_first_step_and_saves_nothing(base, tiny_repo, tmp_path):
    from qistudio.training import NonFiniteError, Trainer

    data = tmp_path / "data"
    write_dataset(data)
    components = fresh(base)
    with torch.no_grad():
        components.dit.proj_out.bias[0] = float("nan")  # a damaged checkpoint
    config = make_config(tiny_repo, data, tmp_path / "out", save_steps=1)
    with pytest.raises(NonFiniteError, match=r"^step 1: the loss of the sample with prompt 'prompt \d, with a comma' is "
                       r"nan; the run stops before it reaches the weights\. No checkpoint was saved yet\. Lower "
                       r"--learning_rate \(now 0\.001\)"):
        Trainer(config, components=components, progress_bar=False).run()
    out = tmp_path / "out"
    assert not list(out.glob("*.safetensors")) and not list(out.glob("checkpoints/step-*"))
    assert not (out / ".qistudio-train.lock").exists()  # the lock is given back however the run ends


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_keeps_its_last_checkpoint(base, tiny_repo, tmp_path,
                                                                                          capsys):
    """A learning rate of 1e30 (finite, so accepted) blows the LoRA up at step 1; step 2's loss is not finite."""
    from safetensors.torch import load_file

    from qistudio.training import NonFiniteError, Trainer

    data = tmp_path / "data"
    write_dataset(data)
    config = make_config(tiny_repo, data, tmp_path / "out", save_steps=1, learning_rate=1e30, lr_scheduler="constant")
    trainer = Trainer(config, components=fresh(base), progress_bar=False)
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss of .* is (nan|inf); .* The last checkpoint, "
                       r".*step-00000001, is intact \(--resume continues from it\)\. Lower --learning_rate \(now 1e\+30\)"):
        trainer.run()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["step-1.safetensors"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints/step-00000001/weights.safetensors").values())
    # and the check before each save: weights that hold NaN are never written
    lora = next(p for name, p in trainer.trained_module.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 1: the trained tensor .*lora_B.* holds NaN or infinity; nothing is "
                       r"saved\. The last checkpoint, .*step-00000001, is intact"):
        trainer.save("nan.safetensors")
    assert not (out / "nan.safetensors").exists() and sorted(os.listdir(out / "checkpoints")) == ["latest",
                                                                                                   "step-00000001"]


def test_the_cli_reports_a_non_finite_loss_in_one_line(tiny_repo, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data)
    args = cli_args(tiny_repo, data, tmp_path / "out") + ["--learning_rate", "1e30", "--lr_scheduler", "constant",
                                                         "--height", "32", "--width", "32", "--max_steps", "3"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qistudio train: step 2: the loss of ") and "Lower --learning_rate (now 1e+30)" in err


@pytest.mark.parametrize("flag", ["--learning_rate", "--weight_decay", "--lora_alpha", "--vram_limit",
                                  "--validation_cfg_scale"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_numbers_are_refused_when_the_arguments_are_read(tiny_repo, tmp_path, capsys, flag, value):
    data = tmp_path / "data"  # never read: the arguments stop first
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(tiny_repo, data, tmp_path / "out") + [f"{flag}={value}"])  # "=": -inf is no option
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("learning_rate", math.inf), ("learning_rate", math.nan),
                                          ("weight_decay", math.nan), ("lora_alpha", math.inf),
                                          ("vram_limit", math.nan), ("validation_cfg_scale", -math.inf)])
def test_non_finite_settings_are_refused_by_the_config_too(tiny_repo, tmp_path, field, value):
    config = make_config(tiny_repo, tmp_path, tmp_path / "out", **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value}"):
        config.check()


# -- one run per output folder ----------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from qistudio.training.lock import acquire
acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_output_is_refused_until_the_first_is_killed(tiny_repo, tmp_path, capsys, caplog):
    from qistudio.training.lock import LOCK_FILE, acquire, read_holder

    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data)
    root = pathlib.Path(__file__).resolve().parents[1]
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert first.stdout.readline().strip() == "locked"
        assert main(cli_args(tiny_repo, data, out)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"qistudio train: another run is writing to {out} (pid {first.pid} on " in err
        assert "give another --output_path" in err and not (out / "training_config.json").exists()
    finally:
        first.kill()  # kill -9: the lock stays behind
        first.wait()
    assert read_holder(out / LOCK_FILE).pid == first.pid
    with caplog.at_level("WARNING"):
        lock = acquire(out)
    assert f"the run that held it (pid {first.pid} on " in caplog.text and "is gone" in caplog.text
    assert read_holder(out / LOCK_FILE).pid == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def live_pid():
    return os.getppid()  # pytest's parent: alive for the whole test


@pytest.mark.parametrize("change, outcome", [
    (dict(pid=None), "live"),  # a live process, its real start time: refused
    (dict(boot_id="a-boot-before-the-last-reboot"), "stale"),
    (dict(started=1), "stale"),  # the pid was reused by a process that started at another time
    (dict(pid=2**22 + 12345, started=None), "stale"),  # beyond pid_max: no such process
    (dict(host="another-machine"), "unknown"),
])  # fmt: skip
def test_a_lock_is_taken_over_only_when_its_run_is_gone(tmp_path, caplog, change, outcome):
    from qistudio.training import RunLockedError
    from qistudio.training.lock import LOCK_FILE, Holder, acquire, process_start, read_holder

    if process_start(os.getpid()) is None:
        pytest.skip("needs Linux's /proc")
    me = Holder.this_process()
    pid = change.get("pid") or live_pid()
    values = {**vars(me), "pid": pid, "started": process_start(pid), **{k: v for k, v in change.items() if k != "pid"}}
    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps(values))
    if outcome == "stale":
        with caplog.at_level("WARNING"):
            acquire(tmp_path).release()
        assert "is gone (killed?); this run takes the lock over" in caplog.text
        assert not (tmp_path / LOCK_FILE).exists()
        return
    message = ("another run is writing to" if outcome == "live" else
               "another run may be writing to .* which cannot be checked from here")
    with pytest.raises(RunLockedError, match=message):
        acquire(tmp_path)
    assert read_holder(tmp_path / LOCK_FILE) == Holder(**values)  # untouched


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path, caplog):
    from qistudio.training import RunLockedError
    from qistudio.training.lock import LOCK_FILE, UNREADABLE_GRACE_S, acquire

    lock = tmp_path / LOCK_FILE
    lock.write_text("{half a lock")
    with pytest.raises(RunLockedError, match="names no run readably; if no run is writing to .* delete it"):
        acquire(tmp_path)
    old = lock.stat().st_mtime - UNREADABLE_GRACE_S - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        acquire(tmp_path).release()
    assert "an unreadable lock file" in caplog.text and not lock.exists()


def test_one_process_shares_its_lock_and_gives_it_back_with_the_last_holder(tmp_path):
    from qistudio.training.lock import LOCK_FILE, acquire

    first = acquire(tmp_path)
    with acquire(tmp_path) as second:
        assert second is first and (tmp_path / LOCK_FILE).exists()
    assert (tmp_path / LOCK_FILE).exists()
    first.release()
    first.release()  # twice is harmless
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_sample_cache_keys_any_row(tmp_path):
    """Cache keys hash each row and its files' sizes: names no file can have, lists and numbers do not stop them."""
    from qistudio.training import DataConfig
    from qistudio.training.cache import row_keys
    from qistudio.training.data import ImageDataset

    write_dataset(tmp_path)
    rows = [{"image": "img0.png", "prompt": "p"}, {"image": "nul\x00byte.png", "prompt": "p"},
            {"image": ["img0.png", 3], "prompt": None}, {"image": 1.5, "prompt": {"a": 1}}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    keys = row_keys(ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.json"))), {"format": 1})
    assert len(set(keys)) == 4


def test_training_images_are_read_as_inference_reads_them(tmp_path):
    """A portrait stored sideways with its EXIF orientation, a 16-bit grey ramp, a transparent picture and a mask
    on transparent black: upright, scaled (not clipped white), flattened on white, and kept black."""
    import numpy as np

    from qistudio.training import DataConfig
    from qistudio.training.data import ImageDataset

    stored = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    stored.save(tmp_path / "sideways.jpg", exif=exif.tobytes())
    Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))).save(tmp_path / "depth16.png")
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    rows = [{"image": "sideways.jpg", "prompt": "p"}, {"image": "depth16.png", "prompt": "p"},
            {"image": "clear.png", "prompt": "p", "blockwise_controlnet_inpaint_mask": "clear.png"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    keys = ("image", "blockwise_controlnet_inpaint_mask")
    dataset = ImageDataset(DataConfig(str(tmp_path), str(tmp_path / "m.json"), data_file_keys=keys))
    assert dataset[0]["image"].size == (32, 64)  # upright: a portrait
    ramp = np.asarray(dataset[1]["image"])[0, :, 0]
    assert ramp[0] < 20 and 100 < ramp[16] < 160 and ramp[-1] > 235  # a ramp, not white
    with pytest.warns(UserWarning, match="alpha channel; it is flattened on white"):
        sample = dataset[2]
    assert np.asarray(sample["image"]).min() == 255 and np.asarray(sample["blockwise_controlnet_inpaint_mask"]).max() == 0
