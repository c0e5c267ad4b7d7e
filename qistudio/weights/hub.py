"""Turn a `ModelConfig` into local file paths, downloading only the matching hub files when needed.

Design note. The network is two operations behind `HubClient`: list a repository's files with their sizes,
and stream one file's bytes from an offset. Everything else (pattern matching, skipping complete files,
resuming into `<file>.incomplete`, the atomic rename, progress, errors) is plain code over bytes and paths,
shared by both hubs and testable with an in-memory client. A file under its final name is always complete:
bytes land in `<file>.incomplete` and are moved with `os.replace` only once the size matches the hub's.
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tqdm.auto import tqdm

if TYPE_CHECKING:  # model_config imports torch; this module stays bytes and paths only
    from .model_config import ModelConfig

PARTIAL_SUFFIX = ".incomplete"
_DRIVE = re.compile(r"^[A-Za-z]:")  # "C:x" names a drive on Windows
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repository root, "/"-separated
    size: int  # bytes


class HubClient(Protocol):
    """The only two network operations: list a repository, stream one file from a byte offset."""

    name: str

    def list_files(self, model_id: str) -> list[RemoteFile]: ...

    def open_range(self, model_id: str, path: str, start: int) -> Iterator[bytes]: ...


class DownloadError(RuntimeError):
    """A hub could not be reached or refused a request; the message says how to work from local files."""


def _skip_prefix(chunks: Iterable[bytes], count: int) -> Iterator[bytes]:
    # A server may ignore Range and answer 200 with the whole file: drop the bytes we already have.
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


class HuggingFaceClient:
    """Hugging Face Hub: `HfApi.list_repo_tree` for sizes, `hf_hub_url` + a ranged GET on the hub's session."""

    name = "Hugging Face"
    chunk_size = 1 << 20

    def list_files(self, model_id: str) -> list[RemoteFile]:
        from huggingface_hub import HfApi, RepoFile

        tree = HfApi().list_repo_tree(model_id, recursive=True)
        return [RemoteFile(entry.path, entry.size) for entry in tree if isinstance(entry, RepoFile)]

    def open_range(self, model_id: str, path: str, start: int) -> Iterator[bytes]:
        from huggingface_hub import constants, get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        headers = build_hf_headers()
        if start:
            headers["Range"] = f"bytes={start}-"
        url = hf_hub_url(model_id, path)
        with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            chunks = response.iter_bytes(self.chunk_size)
            yield from _skip_prefix(chunks, start) if start and response.status_code == 200 else chunks


class ModelScopeClient:
    """ModelScope: `HubApi().get_model_files` for sizes, `get_file_download_url` + a ranged `requests` GET.

    The endpoint is the one `HubApi` resolves (MODELSCOPE_ENDPOINT, else the default site).
    """

    name = "ModelScope"
    chunk_size = 1 << 20
    revision = "master"

    def list_files(self, model_id: str) -> list[RemoteFile]:
        from modelscope.hub.api import HubApi

        entries = HubApi().get_model_files(model_id, recursive=True)
        # Older modelscope lists folders as Type "tree"; newer drops Type, so also drop any path that is a parent.
        parents = {entry["Path"].rsplit("/", 1)[0] for entry in entries if "/" in entry["Path"]}
        return [
            RemoteFile(entry["Path"], int(entry.get("Size") or 0))
            for entry in entries
            if entry.get("Type", "blob") != "tree" and entry["Path"] not in parents
        ]

    def open_range(self, model_id: str, path: str, start: int) -> Iterator[bytes]:
        import requests
        from modelscope.hub.api import HubApi, ModelScopeConfig
        from modelscope.hub.file_download import get_file_download_url

        url = get_file_download_url(model_id, path, self.revision, endpoint=HubApi().endpoint)
        headers = {"Range": f"bytes={start}-"} if start else {}
        cookies = ModelScopeConfig.get_cookies()
        with requests.get(url, headers=headers, cookies=cookies, stream=True, timeout=60) as response:
            response.raise_for_status()
            chunks = response.iter_content(self.chunk_size)
            yield from _skip_prefix(chunks, start) if start and response.status_code == 200 else chunks


def client_for(config: ModelConfig) -> HubClient:
    """The real client for `config.download_source` ("modelscope" or "huggingface"); no network yet."""
    return HuggingFaceClient() if config.download_source == "huggingface" else ModelScopeClient()


def resolve_files(config: ModelConfig, *, client: HubClient | None = None) -> list[Path]:
    """The sorted local paths `config` stands for, downloading missing hub files first (unless skip_download)."""
    if config.path is not None:
        paths = [config.path] if isinstance(config.path, (str, os.PathLike)) else config.path
        return sorted({found for path in paths for found in _local_files(str(path))})
    patterns = _patterns(config.origin_file_pattern)
    root = Path(config.local_model_path) / config.model_id
    if config.skip_download:
        return _select_local(root, patterns)
    client = client or client_for(config)
    try:
        remote = _call(client.list_files, config, root, config.model_id)
    except DownloadError:
        # Offline, but the files may already be here from an earlier download: use them rather than fail.
        try:
            local = _select_local(root, patterns)
        except FileNotFoundError:
            raise_network_error = True
        else:
            raise_network_error = False
        if raise_network_error:
            raise
        warnings.warn(
            f"{client.name} is unreachable; using the files of {config.model_id!r} already under {root} "
            "(they could not be checked against the hub)",
            stacklevel=2,
        )
        return local
    wanted = sorted((file for file in remote if _matches(file.path, patterns)), key=lambda file: file.path)
    if not wanted:
        near = difflib.get_close_matches(patterns[0], [file.path for file in remote], n=5, cutoff=0.3)
        hint = f"; close names: {', '.join(near)}" if near else ""
        raise FileNotFoundError(
            f"No file of {config.model_id!r} on {client.name} matches "
            f"origin_file_pattern={config.origin_file_pattern!r}{hint}"
        )
    _download(client, config, root, wanted)
    return _selection_paths(root, patterns, [file.path for file in wanted])


def _local_files(path: str) -> list[Path]:
    target = Path(path).expanduser()
    if target.is_file():
        return [target]
    if target.is_dir():
        shards = sorted(target.glob("*.safetensors"))
        return shards or [target]  # a folder without shards is itself the resource (a tokenizer, say)
    if any(char in path for char in _GLOB_CHARS):
        matches = sorted(Path(found) for found in glob.glob(os.path.expanduser(path)))
        if matches:
            return matches
        raise FileNotFoundError(f"ModelConfig(path={path!r}): the glob matches no file; check the folder and pattern")
    parent = target.parent
    near = difflib.get_close_matches(target.name, os.listdir(parent), n=3) if parent.is_dir() else []
    hint = f"; did you mean {', '.join(str(parent / name) for name in near)}?" if near else "."
    raise FileNotFoundError(
        f"ModelConfig(path={path!r}): no such file or folder{hint} Give an existing file, folder or glob, "
        "or a hub repository with ModelConfig(model_id=..., origin_file_pattern=...)."
    )


def _patterns(pattern: str | list[str] | None) -> list[str]:
    # None or "" means the whole repository, i.e. the folder pattern for its root.
    patterns = [pattern or ""] if pattern is None or isinstance(pattern, str) else list(pattern)
    return [item.lstrip("/") for item in patterns] or [""]


def _is_folder(pattern: str) -> bool:
    return pattern == "" or pattern.endswith("/")


def _matches(path: str, patterns: list[str]) -> bool:
    return any(path.startswith(item) if _is_folder(item) else fnmatch.fnmatchcase(path, item) for item in patterns)


def _selection_paths(root: Path, patterns: list[str], matched: list[str]) -> list[Path]:
    # A folder pattern stands for its local folder; a file glob for each matched file.
    globs = [item for item in patterns if not _is_folder(item)]
    folders = {root / item for item in patterns if _is_folder(item) and any(path.startswith(item) for path in matched)}
    files = {root / path for path in matched if any(fnmatch.fnmatchcase(path, item) for item in globs)}
    return sorted(folders | files)


def _select_local(root: Path, patterns: list[str]) -> list[Path]:
    local = []
    if root.is_dir():
        local = [f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file() and f.suffix != PARTIAL_SUFFIX]
    matched = sorted(path for path in local if _matches(path, patterns))
    if not matched:
        shown = patterns[0] if len(patterns) == 1 else patterns
        raise FileNotFoundError(
            f"skip_download=True but no file under {root} matches origin_file_pattern={shown!r}; put the files "
            "there (same layout as the hub repository) or allow downloading with skip_download=False"
        )
    return _selection_paths(root, patterns, matched)


def _call(operation, config: ModelConfig, root: Path, *args):
    """Run one network operation, turning any failure into a `DownloadError` that says how to work offline."""
    try:
        return operation(*args)
    except Exception as error:  # connection, DNS, timeout, 401/404: all mean "cannot get it from this hub"
        other = "modelscope" if config.download_source == "huggingface" else "huggingface"
        source = "Hugging Face" if config.download_source == "huggingface" else "ModelScope"
        raise DownloadError(
            f"Could not download {config.model_id!r} from {source} ({config.download_source}): "
            f"{type(error).__name__}: {error}\n"
            f"To use local files instead, pass ModelConfig(path='...') pointing at them, or put them under {root} "
            "(same layout as the repository) and pass skip_download=True (or set QISTUDIO_SKIP_DOWNLOAD=1). "
            f"To try the other hub, pass download_source={other!r} or set QISTUDIO_DOWNLOAD_SOURCE={other}."
        ) from error


def local_target(root: Path, name, model_id: str) -> Path:
    """Where the listed hub file `name` lands: a plain relative path strictly inside `root`, else a DownloadError.

    A listing comes from the network, so it is refused unless every part is an ordinary name: no "", ".", ".."
    (so neither "x/.." nor "" can stand for the folder itself or its parent), no absolute path, no backslash or
    drive letter (which some systems read as separators), no NUL; and the resolved path (symlinks followed) must
    lie below the resolved root, not at it.
    """
    parts = name.split("/") if isinstance(name, str) else None
    plain = bool(parts) and not (_DRIVE.match(name) or "\\" in name or "\0" in name) and all(
        part not in ("", ".", "..") for part in parts)
    target = (root / name).resolve() if plain else None
    base = root.resolve()
    if target is None or target == base or base not in target.parents:
        raise DownloadError(f"{model_id!r} lists {name!r}, which is not a file path inside {root}; refusing it")
    return target


def _parents(path: str) -> list[str]:
    """"a/b/c" -> ["a", "a/b"]."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _download(client: HubClient, config: ModelConfig, root: Path, files: list[RemoteFile]) -> None:
    """Fetch each file not yet complete, resuming from its `.incomplete` bytes; one progress bar for all."""
    todo = []
    listed = {file.path for file in files}
    for file in files:
        target = local_target(root, file.path, config.model_id)
        folder = next((parent for parent in _parents(file.path) if parent in listed), None)
        if folder is not None:
            raise DownloadError(f"{config.model_id!r} lists {folder!r} both as a file and as the folder of "
                                f"{file.path!r}; refusing it")
        if isinstance(file.size, bool) or not isinstance(file.size, int) or file.size < 0:
            raise DownloadError(f"{config.model_id!r} lists {file.path!r} with size {file.size!r}; refusing it")
        if not (target.is_file() and target.stat().st_size == file.size):
            todo.append((file, target))
    if not todo:
        return
    partials = [target.with_name(target.name + PARTIAL_SUFFIX) for _, target in todo]
    sizes = [part.stat().st_size if part.is_file() else 0 for part in partials]
    have = sum(size for size, (file, _) in zip(sizes, todo) if size <= file.size)
    total = sum(file.size for file, _ in todo)
    with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=config.model_id) as bar:
        for (file, target), partial in zip(todo, partials):
            _fetch_one(client, config, root, file, target, partial, bar)


def _fetch_one(client, config, root: Path, file: RemoteFile, target: Path, partial: Path, bar) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    start = partial.stat().st_size if partial.is_file() else 0
    if start > file.size:  # leftover of a different version of the file: start over
        partial.unlink()
        start = 0
    with open(partial, "ab") as sink:
        if start < file.size:
            chunks = iter(_call(client.open_range, config, root, config.model_id, file.path, start))
            while (chunk := _call(next, config, root, chunks, None)) is not None:
                sink.write(chunk)
                bar.update(len(chunk))
    written = partial.stat().st_size
    if written > file.size:  # the server sent more than listed: these bytes cannot be trusted
        partial.unlink()
    if written != file.size:
        raise DownloadError(
            f"{file.path} of {config.model_id!r} stopped at {written} of {file.size} bytes; "
            f"run again to resume from {partial}"
        )
    os.replace(partial, target)
