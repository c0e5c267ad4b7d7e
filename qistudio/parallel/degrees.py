"""How many ranks each mesh dimension gets (data, cfg, ring, ulysses), from numbers or "auto"; checked up front.

Pure Python (no torch): the command line checks `--parallel` with it before spawning anything or loading a model.

- data: images of the batch (prompts x num_images) split across groups of ranks, the outer dimension.
- cfg: 1 or 2; with 2, the positive and the negative guidance branch run on different ranks.
- ulysses: attention heads split; q/k/v go from sequence-sharded to head-sharded by an all-to-all (must divide
  the model's head count: 24 for Qwen-Image).
- ring: keys and values passed around a ring of ranks, partial attentions merged by log-sum-exp (any count, and
  the way past the head count).
Every model runs every layout these checks pass (Qwen-Image 2.1's ring included: parallel/qwen21.py merges its
cached prefix as one more partial), so no model adds a check of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMES = ("data", "cfg", "ulysses", "ring")
QWEN_IMAGE_HEADS = 24


class ParallelConfigError(ValueError):
    """Degrees that cannot run: the message names the bad value and what would be right."""


@dataclass(frozen=True)
class Degrees:
    data: int = 1
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        return self.data * self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """Ranks that share one image's tokens."""
        return self.ulysses * self.ring

    def text(self) -> str:
        """'cfg=2,ulysses=2' (degrees above 1; 'none' when all are 1), as --parallel takes it."""
        parts = [f"{name}={getattr(self, name)}" for name in NAMES if getattr(self, name) > 1]
        return ",".join(parts) or "none"


def parse_degrees(text: str) -> dict[str, int] | str:
    """'cfg=2,ulysses=2' -> {'cfg': 2, 'ulysses': 2}; 'auto' stays 'auto'. Raises ParallelConfigError."""
    text = str(text).strip()
    if text == "auto":
        return "auto"
    degrees: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in NAMES:
            raise ParallelConfigError(f"--parallel {text}: expected NAME=N items with NAME one of {', '.join(NAMES)} "
                                      "(e.g. cfg=2,ulysses=2), or auto")
        if name in degrees:
            raise ParallelConfigError(f"--parallel {text}: {name} is given twice")
        degrees[name] = _positive(value.strip(), name)
    if not degrees:
        raise ParallelConfigError(f"--parallel {text!r}: give degrees such as cfg=2,ulysses=2, or auto")
    return degrees


def _positive(value, name: str) -> int:
    if isinstance(value, bool):
        raise ParallelConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ParallelConfigError(f"{name} must be a whole number >= 1, got {value!r}") from None
    if isinstance(value, float) and number != value or number < 1:
        raise ParallelConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return number


def auto_degrees(world_size: int, num_heads: int, guidance: bool = True) -> Degrees:
    """The layout "auto" picks: with guidance, cfg=2 when the ranks are even (one guidance branch each: no
    communication inside the DiT); then as much Ulysses as divides the heads (one all-to-all per attention), ring
    for the rest."""
    cfg = 2 if guidance and world_size % 2 == 0 else 1
    rest = world_size // cfg
    ulysses = max(d for d in range(1, rest + 1) if rest % d == 0 and num_heads % d == 0)
    return Degrees(cfg=cfg, ulysses=ulysses, ring=rest // ulysses)


def resolve_degrees(spec, world_size: int, num_heads: int = QWEN_IMAGE_HEADS) -> Degrees:
    """Degrees for `world_size` ranks from a dict of degrees (missing ones 1), a Degrees, "auto" or None (auto).

    Raises ParallelConfigError when the product is not the world size, cfg is not 1 or 2, or ulysses does not
    divide the model's heads.
    """
    if spec is None or spec == "auto":
        return auto_degrees(world_size, num_heads)
    if isinstance(spec, Degrees):
        degrees = spec
    else:
        unknown = sorted(set(spec) - set(NAMES))
        if unknown:
            raise ParallelConfigError(f"unknown parallel degree {unknown[0]!r}; the degrees are {', '.join(NAMES)}")
        degrees = Degrees(**{name: _positive(value, name) for name, value in spec.items()})
    if degrees.cfg not in (1, 2):
        raise ParallelConfigError(f"cfg={degrees.cfg}: guidance has two branches, so cfg is 1 or 2")
    if num_heads % degrees.ulysses:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ParallelConfigError(
            f"ulysses={degrees.ulysses} does not divide the model's {num_heads} attention heads; use one of "
            f"{', '.join(map(str, divisors))} and ring for the rest (ring takes any count)")
    if degrees.world_size != world_size:
        raise ParallelConfigError(
            f"{degrees.text()} makes {degrees.world_size} rank(s) (data x cfg x ulysses x ring) but {world_size} "
            f"process(es) run; make the product {world_size}, or pass 'auto'")
    return degrees
