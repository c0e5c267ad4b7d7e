"""resolve_files: local paths, selective and resumable hub downloads, hub choice and offline errors.

Only the two network operations are stubbed: an in-memory `FakeHub` serves a small repository, and the
offline tests patch the HTTP libraries' send functions under the real clients.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from qistudio.weights import hub
from qistudio.weights.hub import (
    DownloadError,
    HuggingFaceClient,
    ModelScopeClient,
    RemoteFile,
    client_for,
    resolve_files,
)
from qistudio.weights.model_config import ModelConfig

MODEL_ID = "Qwen/Tiny-Image"


class FakeHub:
    """A repository held in memory; records every byte request as (path, start)."""

    name = "FakeHub"

    def __init__(self, files: dict[str, bytes], chunk: int = 100):
        self.files = files
        self.chunk = chunk
        self.requests: list[tuple[str, int]] = []
        self.fail_after: dict[str, int] = {}  # path -> bytes served before the stream raises

    def list_files(self, model_id):
        assert model_id == MODEL_ID
        return [RemoteFile(path, len(data)) for path, data in self.files.items()]

    def open_range(self, model_id, path, start):
        self.requests.append((path, start))
        data, limit = self.files[path], self.fail_after.pop(path, None)
        for offset in range(start, len(data), self.chunk):
            end = min(offset + self.chunk, len(data))
            if limit is not None and end > limit:
                yield data[offset:limit]
                raise ConnectionResetError("connection reset by peer")
            yield data[offset:end]


@pytest.fixture
def repo():
    rng = random.Random(0)
    sizes = {
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 1000,
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": 700,
        "transformer/config.json": 50,
        "vae/diffusion_pytorch_model.safetensors": 300,
        "tokenizer/vocab.json": 120,
        "tokenizer/merges.txt": 80,
        "README.md": 10,
    }
    return FakeHub({path: rng.randbytes(size) for path, size in sizes.items()})


def hub_config(tmp_path, pattern, **kwargs):
    return ModelConfig(model_id=MODEL_ID, origin_file_pattern=pattern, local_model_path=str(tmp_path), **kwargs)


def test_pattern_downloads_only_matching_files(tmp_path, repo):
    config = hub_config(tmp_path, "transformer/diffusion_pytorch_model*.safetensors")
    paths = resolve_files(config, client=repo)
    root = tmp_path / MODEL_ID
    assert paths == [root / "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                     root / "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert sorted(path for path, _ in repo.requests) == [p.relative_to(root).as_posix() for p in paths]
    for path in paths:
        assert path.read_bytes() == repo.files[path.relative_to(root).as_posix()]
    assert sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()) == [
        p.relative_to(root).as_posix() for p in paths
    ]


def test_folder_pattern_returns_the_folder(tmp_path, repo):
    paths = resolve_files(hub_config(tmp_path, "tokenizer/"), client=repo)
    folder = tmp_path / MODEL_ID / "tokenizer"
    assert paths == [folder]
    assert sorted(os.listdir(folder)) == ["merges.txt", "vocab.json"]
    assert sorted(path for path, _ in repo.requests) == ["tokenizer/merges.txt", "tokenizer/vocab.json"]


def test_list_of_patterns(tmp_path, repo):
    paths = resolve_files(hub_config(tmp_path, ["vae/*.safetensors", "tokenizer/"]), client=repo)
    assert paths == [tmp_path / MODEL_ID / "tokenizer", tmp_path / MODEL_ID / "vae/diffusion_pytorch_model.safetensors"]
    assert len(repo.requests) == 3


def test_second_call_downloads_nothing(tmp_path, repo):
    config = hub_config(tmp_path, "transformer/*")
    first = resolve_files(config, client=repo)
    assert len(repo.requests) == 3
    repo.requests.clear()
    assert resolve_files(config, client=repo) == first
    assert repo.requests == []


def test_changed_size_is_downloaded_again(tmp_path, repo):
    config = hub_config(tmp_path, "vae/*")
    (path,) = resolve_files(config, client=repo)
    repo.files["vae/diffusion_pytorch_model.safetensors"] += b"more"
    repo.requests.clear()
    resolve_files(config, client=repo)
    assert repo.requests == [("vae/diffusion_pytorch_model.safetensors", 0)]
    assert path.read_bytes() == repo.files["vae/diffusion_pytorch_model.safetensors"]


def test_broken_download_resumes_with_a_range_request(tmp_path, repo):
    name = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
    config = hub_config(tmp_path, name)
    repo.fail_after[name] = 437
    with pytest.raises(DownloadError) as caught:
        resolve_files(config, client=repo)
    message = str(caught.value)
    assert MODEL_ID in message and "ModelConfig(path=" in message and "skip_download=True" in message
    assert "QISTUDIO_DOWNLOAD_SOURCE=huggingface" in message
    final = tmp_path / MODEL_ID / name
    partial = final.with_name(final.name + hub.PARTIAL_SUFFIX)
    assert not final.exists()
    assert partial.read_bytes() == repo.files[name][:437]

    repo.requests.clear()
    assert resolve_files(config, client=repo) == [final]
    assert repo.requests == [(name, 437)]
    assert final.read_bytes() == repo.files[name]
    assert not partial.exists()


def test_short_stream_keeps_partial_and_says_so(tmp_path, repo):
    class ShortHub(FakeHub):
        def open_range(self, model_id, path, start):
            yield self.files[path][start:start + 10]

    short = ShortHub(repo.files)
    with pytest.raises(DownloadError, match="resume"):
        resolve_files(hub_config(tmp_path, "vae/*"), client=short)
    assert not (tmp_path / MODEL_ID / "vae/diffusion_pytorch_model.safetensors").exists()


def test_pattern_matching_nothing_on_the_hub(tmp_path, repo):
    with pytest.raises(FileNotFoundError, match="origin_file_pattern"):
        resolve_files(hub_config(tmp_path, "text_encoder/*.safetensors"), client=repo)


def test_skip_download_uses_local_files_only(tmp_path, repo):
    resolve_files(hub_config(tmp_path, "tokenizer/"), client=repo)
    repo.requests.clear()

    class NoNetwork:
        name = "none"

        def list_files(self, model_id):
            raise AssertionError("skip_download must not list the hub")

        open_range = list_files

    assert resolve_files(hub_config(tmp_path, "tokenizer/", skip_download=True), client=NoNetwork()) == [
        tmp_path / MODEL_ID / "tokenizer"
    ]
    with pytest.raises(FileNotFoundError) as caught:
        resolve_files(hub_config(tmp_path, "vae/*.safetensors", skip_download=True), client=NoNetwork())
    assert str(tmp_path / MODEL_ID) in str(caught.value) and "vae/*.safetensors" in str(caught.value)


# --- choosing the hub ---------------------------------------------------------------------------------------


def test_source_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv("QISTUDIO_DOWNLOAD_SOURCE", raising=False)
    monkeypatch.delenv("DIFFSYNTH_DOWNLOAD_SOURCE", raising=False)
    assert isinstance(client_for(ModelConfig(model_id=MODEL_ID)), ModelScopeClient)
    assert isinstance(client_for(ModelConfig(model_id=MODEL_ID, download_source="huggingface")), HuggingFaceClient)
    monkeypatch.setenv("QISTUDIO_DOWNLOAD_SOURCE", "huggingface")
    assert isinstance(client_for(ModelConfig(model_id=MODEL_ID)), HuggingFaceClient)
    assert isinstance(client_for(ModelConfig(model_id=MODEL_ID, download_source="modelscope")), ModelScopeClient)


@pytest.mark.parametrize("source, cls", [("huggingface", HuggingFaceClient), ("modelscope", ModelScopeClient)])
def test_resolve_uses_the_chosen_real_client(tmp_path, repo, monkeypatch, source, cls):
    # Stub only the class's two network methods; resolve_files must pick this class from the config.
    monkeypatch.setattr(cls, "list_files", lambda self, model_id: repo.list_files(model_id))
    monkeypatch.setattr(cls, "open_range", lambda self, *args: repo.open_range(*args))
    paths = resolve_files(hub_config(tmp_path, "vae/*", download_source=source))
    assert paths[0].read_bytes() == repo.files["vae/diffusion_pytorch_model.safetensors"]


def test_huggingface_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import httpx2

    def refuse(*args, **kwargs):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(httpx2.Client, "send", refuse)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the hub library backs off between retries
    with pytest.raises(DownloadError) as caught:
        resolve_files(hub_config(tmp_path, "vae/*", download_source="huggingface"))
    message = str(caught.value)
    assert MODEL_ID in message and "Hugging Face" in message and "ConnectError" in message
    assert "ModelConfig(path=" in message and "skip_download=True" in message
    assert "QISTUDIO_DOWNLOAD_SOURCE=modelscope" in message


def test_modelscope_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import requests

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'www.modelscope.cn'")

    monkeypatch.setattr(requests.Session, "send", refuse)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with pytest.raises(DownloadError) as caught:
        resolve_files(hub_config(tmp_path, "vae/*", download_source="modelscope"))
    message = str(caught.value)
    assert MODEL_ID in message and "ModelScope" in message
    assert "ModelConfig(path=" in message and "QISTUDIO_DOWNLOAD_SOURCE=huggingface" in message


def test_offline_during_download_also_gives_the_clear_error(tmp_path, monkeypatch):
    import httpx2

    monkeypatch.setattr(HuggingFaceClient, "list_files", lambda self, model_id: [RemoteFile("a.bin", 5)])
    monkeypatch.setattr(httpx2.Client, "send", lambda *a, **k: (_ for _ in ()).throw(httpx2.ConnectError("down")))
    with pytest.raises(DownloadError, match="Hugging Face"):
        resolve_files(hub_config(tmp_path, "a.bin", download_source="huggingface"))
    assert not (tmp_path / MODEL_ID / "a.bin").exists()


# --- local paths --------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    for name in ["b.safetensors", "a.safetensors", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.safetensors").write_bytes(b"x")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    return tmp_path


def test_local_file(folder):
    assert resolve_files(ModelConfig(path=str(folder / "notes.txt"))) == [folder / "notes.txt"]


def test_local_list(folder):
    config = ModelConfig(path=[str(folder / "b.safetensors"), str(folder / "a.safetensors")])
    assert resolve_files(config) == [folder / "a.safetensors", folder / "b.safetensors"]


def test_local_dir_means_its_safetensors(folder):
    assert resolve_files(ModelConfig(path=str(folder))) == [folder / "a.safetensors", folder / "b.safetensors"]


def test_local_dir_without_safetensors_is_itself(folder):
    assert resolve_files(ModelConfig(path=str(folder / "tokenizer"))) == [folder / "tokenizer"]


def test_local_glob(folder):
    assert resolve_files(ModelConfig(path=str(folder / "**" / "*.safetensors"))) == [folder / "sub" / "c.safetensors"]
    assert resolve_files(ModelConfig(path=str(folder / "*.txt"))) == [folder / "notes.txt"]
    with pytest.raises(FileNotFoundError, match="glob"):
        resolve_files(ModelConfig(path=str(folder / "*.bin")))


def test_local_missing_names_the_path_and_suggests(folder):
    missing = str(folder / "a.safetensor")
    with pytest.raises(FileNotFoundError) as caught:
        resolve_files(ModelConfig(path=missing))
    message = str(caught.value)
    assert missing in message and f"did you mean {folder / 'a.safetensors'}" in message and "model_id=" in message


def test_offline_with_files_already_downloaded_uses_them(tmp_path):
    """An earlier download is usable offline: the listing fails, the local copy is taken with a warning."""
    import pytest as _pytest

    from qistudio.weights.hub import DownloadError, resolve_files as _resolve
    from qistudio.weights.model_config import ModelConfig as _Config

    class Offline:
        name = "ModelScope"

        def list_files(self, model_id):
            raise ConnectionError("no network")

        def open_range(self, model_id, path, start):
            raise AssertionError("no byte request expected")

    root = tmp_path / "Org" / "Model" / "vae"
    root.mkdir(parents=True)
    (root / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    config = _Config(model_id="Org/Model", origin_file_pattern="vae/*.safetensors", local_model_path=str(tmp_path))
    with _pytest.warns(UserWarning, match="unreachable; using the files"):
        assert _resolve(config, client=Offline()) == [root / "diffusion_pytorch_model.safetensors"]
    missing = _Config(model_id="Org/Model", origin_file_pattern="transformer/*", local_model_path=str(tmp_path))
    with _pytest.raises(DownloadError, match="Org/Model"):
        _resolve(missing, client=Offline())


# A listing comes from the network: each of these names must be refused before a byte is requested or written.
BAD_LISTED_NAMES = [".", "", "x/..", "..", "../x", "x/../..", "x/../../y", "/etc/passwd", "//x", "a//b", "a/./b",
                    "a/", "a\\..\\..\\b", "..\\x", "C:x", "c:/x", "a\x00b"]


@pytest.mark.parametrize("name", BAD_LISTED_NAMES)
def test_listing_entries_that_are_not_files_inside_the_folder_are_refused(tmp_path, name):
    good = "transformer/config.json"
    fake = FakeHub({good: b"{}", name: b"overwrite me"})
    models = tmp_path / "models"
    with pytest.raises(DownloadError, match=r"lists .* which is not a file path inside .*refusing it"):
        resolve_files(ModelConfig(model_id=MODEL_ID, origin_file_pattern="", local_model_path=str(models)),
                      client=fake)
    assert fake.requests == []  # refused before the first download, good files included
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == []


def test_a_listed_name_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    root = tmp_path / "models" / MODEL_ID
    root.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    fake = FakeHub({"link/weights.safetensors": b"x"})
    with pytest.raises(DownloadError, match="link/weights.safetensors"):
        resolve_files(ModelConfig(model_id=MODEL_ID, local_model_path=str(tmp_path / "models")), client=fake)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and fake.requests == []


@pytest.mark.parametrize("size", [-1, "12", None, True])
def test_a_listed_size_that_is_not_a_byte_count_is_refused(tmp_path, size):
    fake = FakeHub({"a.json": b"{}"})
    fake.list_files = lambda model_id: [RemoteFile("a.json", size)]
    with pytest.raises(DownloadError, match="size"):
        resolve_files(hub_config(tmp_path, "a.json"), client=fake)


@pytest.mark.parametrize("model_id", ["../outside", "Qwen/../../x", "/abs/name", "a/b/c", "a\\b", "", ".", "a/"])
def test_a_model_id_that_would_leave_the_model_folder_is_refused(tmp_path, model_id):
    with pytest.raises(ValueError, match="is not a hub repository id"):
        ModelConfig(model_id=model_id, local_model_path=str(tmp_path))


def test_a_listing_with_one_name_as_both_file_and_folder_is_refused(tmp_path):
    fake = FakeHub({"a": b"1", "a/b.json": b"{}"})
    with pytest.raises(DownloadError, match="lists 'a' both as a file and as the folder of 'a/b.json'"):
        resolve_files(hub_config(tmp_path, ""), client=fake)
    assert fake.requests == []
