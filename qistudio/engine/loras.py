"""LoRAs a server may use: found by name in the folders named at start-up, switched per batch without reloading.

A request names LoRAs, never paths: `LoRACatalog` maps the names it found under its folders (the file's path
relative to its folder, without `.safetensors`; a folder holding `*.safetensors` is one LoRA too) to files, and a
name is only ever looked up in that map. `LoRASlots` keeps the LoRAs a worker has loaded beside the DiT, unfused:
a batch sets the scales of its own LoRAs and zero for the others (an unfused LoRA at scale 0 adds nothing: the
hook skips it), so switching costs a dictionary update and the base weights are never touched. Beyond
`max_loaded`, the least recently used idle LoRA is unloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

SUFFIX = ".safetensors"


class LoRACatalog:
    """Names -> files, for the LoRAs under the given folders (searched again when a name is not found)."""

    def __init__(self, folders=()):
        self.folders = [Path(f).expanduser().resolve() for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"--lora-dir {folder}: no such folder")
        self._files: dict[str, Path] = {}
        self.rescan()

    def rescan(self) -> None:
        found: dict[str, Path] = {}
        for folder in self.folders:
            for path in sorted(folder.rglob(f"*{SUFFIX}")):
                if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
                    continue
                name = path.relative_to(folder).with_suffix("").as_posix()
                found.setdefault(name, path.resolve())
                # A folder of LoRA files (diffusers/PEFT layout) is also offered under the folder's own name.
                if path.parent != folder:
                    found.setdefault(path.parent.relative_to(folder).as_posix(), path.parent.resolve())
        self._files = found

    def names(self) -> list[str]:
        return sorted(self._files)

    def __contains__(self, name) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._files:
            self.rescan()
        return name in self._files

    def __iter__(self):
        return iter(self.names())

    def path(self, name: str) -> Path:
        if name not in self:
            raise KeyError(name)
        return self._files[name]


class LoRASlots:
    """The LoRAs loaded on one worker's pipeline, keyed by catalog name, unfused."""

    def __init__(self, pipe, max_loaded: int = 8):
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first

    def activate(self, wanted, paths: dict) -> None:
        """Scale each LoRA of `wanted` ((name, scale) pairs) as asked and every other loaded LoRA to 0; `paths`
        maps the names not loaded yet to the files the engine's catalog found."""
        wanted = dict(wanted)
        for name in self.loaded:
            if name not in wanted:
                self.pipe.set_lora_scale(name, 0.0)
        for name, scale in wanted.items():
            if name in self.loaded:
                self.pipe.set_lora_scale(name, scale)
                self.loaded.move_to_end(name)
            else:
                self._evict(keep=set(wanted))
                self.pipe.load_lora(self.pipe.dit, str(paths[name]), alpha=scale, name=name)
                self.loaded[name] = None

    def _evict(self, keep: set) -> None:
        for name in list(self.loaded):
            if len(self.loaded) < self.max_loaded:
                return
            if name not in keep:
                self.pipe.unload_lora(name)
                del self.loaded[name]
