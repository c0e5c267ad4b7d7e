"""What the UI was started with: the engine it submits to (swappable when the UI owns it), the model's facts, and
where results and training runs are written.

Design note. Every tab reads the engine through `EngineHolder.engine` at the moment it submits, so the Models tab
can restart the workers with other settings (a new Engine over a new ModelSpec) without the tabs holding a stale
one. A UI mounted inside `qistudio serve` shares the server's engine and may not swap it (`reload` is None): the
server's API clients rely on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class EngineHolder:
    """The engine the UI submits to; `swap` replaces it by one started over another ModelSpec."""

    def __init__(self, engine):
        self._engine = engine
        self._lock = threading.Lock()

    @property
    def engine(self):
        return self._engine

    @property
    def spec(self):
        return self._engine.config.model

    def swap(self, spec, start: Callable) -> None:
        """Stop the current engine and start `start(spec)`; if that fails, the old spec is started again and the
        error re-raised (so the UI always has a working engine)."""
        with self._lock:
            old = self._engine.config.model
            self._engine.shutdown(timeout=60)
            try:
                self._engine = start(spec)
            except Exception:
                self._engine = start(old)
                raise

    def shutdown(self) -> None:
        self._engine.shutdown()


@dataclass
class UIContext:
    holder: EngineHolder
    output_dir: Path  # results (images/), the inputs that made them (inputs/), training runs (train/)
    reload: Callable | None = None  # (changes: dict) -> ModelSpec, for the Models tab; None: the engine is shared
    start_engine: Callable | None = None  # ModelSpec -> started Engine (with reload)
    runs: object = field(default=None)  # runs.Runs, made by build_blocks
    training: object = field(default=None)  # training.TrainingRun, made by build_blocks

    @property
    def engine(self):
        return self.holder.engine

    # What the loaded model is, from its ModelSpec's extra fields (cli.serve.model_spec writes demo and model).
    @property
    def demo(self) -> bool:
        return bool(self.holder.spec.extra.get("demo"))

    @property
    def png_model(self) -> str | None:
        """What PNGs record as "model": the CLI's --model value (None for the demo)."""
        return self.holder.spec.extra.get("model")

    @property
    def qwen21(self) -> bool:
        """Qwen-Image 2.1 is served: 40 steps without guidance at 1024x1024 by default (cli/generate21.py)."""
        return self.holder.spec.family == "qwen-image-2.1"

    @property
    def default_size(self) -> tuple[int, int]:
        from ..cli.generate import DEMO_SIZE, FULL_SIZE
        from ..cli.generate21 import QWEN21_SIZE

        return DEMO_SIZE if self.demo else QWEN21_SIZE if self.qwen21 else FULL_SIZE

    @property
    def default_steps(self) -> int:
        from ..cli.generate import DEMO_STEPS, FULL_STEPS
        from ..cli.generate21 import QWEN21_STEPS

        return DEMO_STEPS if self.demo else QWEN21_STEPS if self.qwen21 else FULL_STEPS

    @property
    def default_cfg(self) -> float:
        from ..cli.generate21 import QWEN21_CFG

        return QWEN21_CFG if self.qwen21 else 4.0

    @property
    def picture_template(self) -> bool:
        """Whether the model reads even one edit image as "Picture 1:" (Edit-2509/2511)."""
        from ..cli.generate import uses_picture_template

        return bool(self.png_model) and uses_picture_template({"edit": [None], "model": self.png_model})

    @property
    def images_dir(self) -> Path:
        return self.output_dir / "images"

    @property
    def inputs_dir(self) -> Path:
        return self.output_dir / "inputs"

    @property
    def train_dir(self) -> Path:
        return self.output_dir / "train"
