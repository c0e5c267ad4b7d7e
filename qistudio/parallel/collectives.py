"""The collectives of a parallel run, over torch's functional collectives; a failed one is one clear error.

Layouts: attention tensors are (B, S, H, D) as ops/attention takes them. Functional collectives return at once
(an AsyncCollectiveTensor); `wait` makes the result real, and is where a dead or silent peer shows: a gloo
peer that exits closes its sockets (an error at once), one that stops answering hits the process group's timeout
(NCCL's watchdog likewise). Either way every rank raises ParallelError naming the step, never hangs.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class ParallelError(RuntimeError):
    """Talking to the other ranks failed: one of them died, ran out of memory or stopped answering."""


def _fail(what: str, error: Exception) -> ParallelError:
    reason = " ".join(str(error).split())
    if len(reason) > 240:
        reason = reason[:237] + "..."
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ParallelError(f"rank {rank}: {what} with the other ranks failed ({type(error).__name__}: {reason}); "
                         "another rank died or stopped answering within the timeout: its own output says why")


# Words of the backends' own messages when a peer is gone (gloo: "Connection reset by peer", "Timed out waiting";
# NCCL: "NCCL error", "Watchdog"): collectives inside compiled graphs raise these unconverted.
_LOST_PEER_WORDS = ("gloo", "nccl", "c10d", "connection", "timed out", "timeout", "watchdog")


def lost_peer(error: BaseException, what: str) -> ParallelError | None:
    """`error` as a ParallelError if it is a collective's failure (raised inside a compiled graph, where `wait`
    does not run), else None."""
    if isinstance(error, ParallelError):
        return None
    text = str(error).lower()
    if isinstance(error, dist.DistError) or any(word in text for word in _LOST_PEER_WORDS):
        return _fail(what, error)
    return None


def wait(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The result of a functional collective, raising ParallelError if the collective failed."""
    try:
        if isinstance(tensor, funcol.AsyncCollectiveTensor):
            return tensor.wait()
        return funcol.wait_tensor(tensor)  # traced code gets plain tensors
    except (RuntimeError, dist.DistError) as error:
        raise _fail(what, error) from None


def _issue(fn, what: str, *args) -> torch.Tensor:
    try:
        return fn(*args)
    except (RuntimeError, dist.DistError) as error:
        raise _fail(what, error) from None


class Pending:
    """A collective issued and not yet waited for (the transfer runs meanwhile); `result()` waits for it and lays
    the received data out."""

    def __init__(self, tensor: torch.Tensor, what: str, layout=None):
        self.tensor, self.what, self.layout = tensor, what, layout

    def result(self) -> torch.Tensor:
        received = wait(self.tensor, self.what)
        return received if self.layout is None else self.layout(received)


def _as_bytes(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
    """float8 tensors travel as their bytes (uint8 views: every backend moves those; one byte an element either
    way), with the dtype to view the result back as; other tensors as they are."""
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return x.view(torch.uint8), x.dtype
    return x, None


def start_all_to_all(x: torch.Tensor, group: dist.ProcessGroup, what: str, then=None) -> Pending:
    """Chunk i of dim 0 goes to group rank i; the result holds the chunks received, in group rank order (same
    shape), laid out by `then` if given."""
    shape = x.shape
    flat, dtype = _as_bytes(x.contiguous().flatten())
    # all_to_all_single splits the flat buffer by dim 0 of what it is given; flat avoids a stride check.
    out = _issue(funcol.all_to_all_single, what, flat, None, None, group)
    return Pending(out, what, lambda received: (then or (lambda r: r))(
        (received if dtype is None else received.view(dtype)).reshape(shape)))


def start_sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, size: int,
                            what: str = "ulysses all-to-all") -> Pending:
    """(..., B, n, H, D) holding n tokens of every head -> (..., B, size n, H / size, D): every token, the heads
    of this group rank. Leading dimensions (q, k, v stacked) travel in the same collective."""
    *lead, batch, tokens, heads, dim = x.shape
    parts = x.reshape(*lead, batch, tokens, size, heads // size, dim).movedim(-3, 0)  # (size, ..., B, n, h, D)
    # chunk j: group rank j's tokens, our heads
    return start_all_to_all(parts, group, what, lambda received: received.movedim(0, -4).reshape(
        *lead, batch, size * tokens, heads // size, dim))


def start_heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, size: int,
                            what: str = "ulysses all-to-all back") -> Pending:
    """The inverse of start_sequence_to_heads: (B, size n, h, D) -> (B, n, size h, D)."""
    batch, tokens, heads, dim = x.shape
    parts = x.reshape(batch, size, tokens // size, heads, dim).movedim(1, 0)  # (size, B, n, h, D)
    # chunk j: our tokens, group rank j's heads
    return start_all_to_all(parts, group, what, lambda received: received.movedim(0, 2).reshape(
        batch, tokens // size, size * heads, dim))


def start_all_gather(x: torch.Tensor, group: dist.ProcessGroup, what: str) -> Pending:
    """(size, *x.shape): every group rank's x, in group rank order."""
    size = dist.get_world_size(group)
    if size == 1:
        return Pending(x[None], what)
    data, dtype = _as_bytes(x.contiguous())
    out = _issue(funcol.all_gather_single, what, data, 0, group)
    return Pending(out, what, lambda received: (received if dtype is None else received.view(dtype)).reshape(
        size, *x.shape))


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, what: str) -> torch.Tensor:
    return start_all_gather(x, group, what).result()


class RingShift(Pending):
    """x sent to the next rank of the ring while the previous rank's arrives; `result()` waits for it."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup, size: int, what: str = "ring K/V pass"):
        shape = x.shape
        super().__init__(_issue(funcol.permute_tensor, what, x.contiguous().flatten(),
                                [(m + 1) % size for m in range(size)], group), what,
                         lambda received: received.reshape(shape))


def all_reduce_sum(x: torch.Tensor, what: str) -> torch.Tensor:
    """The sum of every rank's x, on every rank."""
    if dist.get_world_size() == 1:
        return x
    return wait(_issue(funcol.all_reduce, what, x.contiguous(), "sum", dist.group.WORLD), what)


def all_reduce_max(x: torch.Tensor, what: str) -> torch.Tensor:
    """The element-wise maximum of every rank's x, on every rank."""
    if dist.get_world_size() == 1:
        return x
    return wait(_issue(funcol.all_reduce, what, x.contiguous(), "max", dist.group.WORLD), what)


def broadcast(x: torch.Tensor, what: str, src: int = 0) -> torch.Tensor:
    """Rank `src`'s x on every rank of the world (x gives the shape and dtype elsewhere)."""
    if dist.get_world_size() == 1:
        return x
    out = _issue(funcol.broadcast, what, x.contiguous(), src, dist.group.WORLD)
    return wait(out, what)


def broadcast_json(value, what: str, device: torch.device, src: int = 0):
    """Rank `src`'s JSON-able value on every rank (length first, then the UTF-8 bytes; no pickle)."""
    if dist.get_world_size() == 1:
        return value
    data = json.dumps(value).encode() if dist.get_rank() == src else b""
    length = broadcast(torch.tensor([len(data)], dtype=torch.int64, device=device), what)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if data:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    return json.loads(bytes(broadcast(buffer, what).cpu().tolist()).decode())
