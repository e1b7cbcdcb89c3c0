"""The ranks of a distributed job (``torchrun``, ``accelerate launch``) caching into one store.

:func:`joined` finds the job through ``torch.distributed``: the process group the caller
initialised, or else the one it starts itself when a launcher's environment is set (``RANK`` and
``WORLD_SIZE`` > 1, with ``MASTER_ADDR`` / ``MASTER_PORT``): gloo, timeout :data:`TIMEOUT`, left
initialised for the rest of the process. Its own messages go over a gloo group it makes for the
call (same timeout) and removes after, so they work whatever backend the caller chose (NCCL
included) and never touch a GPU. Every rank must make the same calls, in the same order.

Shard ``k`` belongs to rank ``k % world``. Every step that can fail ends in :func:`agree`: the
ranks say whether it worked, and if one did not, every rank raises (the one that failed its own
error, the others :class:`RankError` naming it), so an error on one rank never leaves the others
waiting. :func:`write_store` is the protocol for one store:

1. rank 0 claims the store (:meth:`ActivationStore.writing`: ``.writer.lock``, which keeps other
   jobs out; a store to resume has its killed job's manifest parts merged and its dead rank
   locks taken over);
2. every rank holds ``.writer-rank{R}.lock``, writes its missing shards and records each in its
   own manifest part ``manifest.rank{R}.json`` (:meth:`ActivationStore.writing_rank`);
3. when every rank has stopped (finished or failed), rank 0 merges the parts into
   ``manifest.json`` in one atomic write and deletes them, then releases ``.writer.lock``; the
   ranks return (or raise) together, the store then holding exactly what a single process
   writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from interp.store.disk import ActivationStore

T = TypeVar("T")

TIMEOUT = timedelta(hours=1)
"""How long a rank waits for the others at one step before it raises. A rank that finishes its
shards early waits for the slowest one (about one shard's work on a fresh run; more when a
resumed store left them uneven). A rank that dies outright is seen sooner: the launcher stops
the others."""


class RankError(RuntimeError):
    """Another rank of the job failed; the message names the rank, the step and its error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job of ``world`` processes; ``group`` carries the messages."""

    rank: int
    world: int
    group: Any  # a gloo torch.distributed ProcessGroup

    def owns(self, shard: int) -> bool:
        """Whether shard ``shard`` is this rank's to compute (shard k belongs to rank k % world)."""
        return shard % self.world == self.rank


def _started(timeout: timedelta) -> bool:
    """Whether this process is one rank of a job; starts the default process group from a
    launcher's environment when nobody has."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    try:
        dist.init_process_group("gloo", timeout=timeout)
    except (ValueError, RuntimeError) as e:
        raise RuntimeError(f"RANK and WORLD_SIZE are set (a torchrun-style launch) but the process group did not "
                           f"start: {e}") from e
    return True


@contextmanager
def joined(timeout: timedelta = TIMEOUT) -> Iterator[Ranks | None]:
    """The job this process is a rank of, with a gloo group for the block; None when it runs
    alone (no job, or a job of one)."""
    if not _started(timeout) or dist.get_world_size() == 1:
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), group)
    finally:
        dist.destroy_process_group(group)


def _gather_text(ranks: Ranks, text: str) -> list[str]:
    """Every rank's ``text``, in rank order (UTF-8 bytes over two all-gathers)."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(data)]), group=ranks.group)
    width = max(int(s) for s in sizes)
    if width == 0:
        return [""] * ranks.world
    mine = torch.zeros(width, dtype=torch.uint8)
    mine[:len(data)] = data
    got = [torch.zeros(width, dtype=torch.uint8) for _ in range(ranks.world)]
    dist.all_gather(got, mine, group=ranks.group)
    return [bytes(g[:int(s)].tolist()).decode("utf-8") for g, s in zip(got, sizes)]


def agree(ranks: Ranks | None, step: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on this rank, then hear from every rank whether its part of ``step`` worked:
    if this rank failed, raise its error; if another did, :class:`RankError` naming it. Alone
    (``ranks`` None), just ``fn()``. An interrupt (``BaseException``) passes straight through:
    the process ends and the launcher stops the others."""
    if ranks is None:
        return fn()
    result: Any = None
    try:
        result, error = fn(), None
    except Exception as e:
        error = e
    said = _gather_text(ranks, "" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(said) if m]
    if failed:
        r, message = failed[0]
        more = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
        raise RankError(f"rank {r} of {ranks.world} failed {step}{more}: {message}")
    return result


def check_same(ranks: Ranks | None, what: str, record: Any) -> None:
    """Raise on every rank unless every rank holds the same JSON-able ``record`` (``what`` names
    it in the message): ranks given other arguments would otherwise compute parts of different
    runs."""
    if ranks is None:
        return
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    said = _gather_text(ranks, digest)
    others = [r for r, d in enumerate(said) if d != said[0]]
    if others:
        raise RankError(f"the ranks were given different {what}: rank {others[0]}'s differ from rank 0's; every "
                        "rank must make the same call")


def share(ranks: Ranks, owner: int, tensor: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype
          ) -> torch.Tensor:
    """``tensor`` of rank ``owner`` on every rank, bit for bit (``shape`` and ``dtype`` known to
    all; the others pass None)."""
    if ranks.rank == owner:
        if tensor is None or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"rank {owner} shares a tensor of {tuple(shape)} {dtype}, "
                             f"got {None if tensor is None else (tuple(tensor.shape), tensor.dtype)}")
        out = tensor.detach().cpu().contiguous()
    else:
        out = torch.empty(tuple(shape), dtype=dtype)
    dist.broadcast(out.view(-1).view(torch.uint8), src=owner, group=ranks.group)
    return out


def write_store(ranks: Ranks, path: str | Path, meta: dict, transcripts: list[dict],
                write: Callable[[ActivationStore], None]) -> ActivationStore:
    """Write one store from every rank of the job (the protocol in the module's docstring):
    ``write(store)`` writes this rank's missing shards through ``store.write_shard``. Returns the
    finished store on every rank; raises on every rank if any failed (the store then holds every
    shard finished before, and resumes)."""
    failure: Exception | None = None
    with ExitStack() as whole:
        main = agree(ranks, "to claim the store", lambda: whole.enter_context(
            ActivationStore.writing(path, meta, transcripts)) if ranks.rank == 0 else None)
        with ExitStack() as own:
            st = agree(ranks, "to hold its part of the store", lambda: own.enter_context(
                ActivationStore.writing_rank(path, meta, transcripts, ranks.rank)))
            try:
                agree(ranks, "while caching", lambda: write(st))
            except Exception as e:  # every rank has stopped writing: merge what was finished
                failure = e
        agree(ranks, "to merge the manifest", lambda: main.merge_parts() if main is not None else None)
    agree(ranks, "to release the store", lambda: None)  # rank 0 has let go of .writer.lock
    if failure is not None:
        raise failure
    return ActivationStore.open(path, verify=False)
