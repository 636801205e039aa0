"""Profiling under ``torchrun``: the ranks split the data and all-reduce the sums.

``torchrun --nproc-per-node N -m mfprune profile ...`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts N copies. Every rank reads and
tokenizes all of DATA — so every rank knows the whole data's token count and fingerprint, the
stats describe the whole data exactly as one process would, and a rank whose data differs is
caught before the model loads — then profiles every N-th chunk (dealt longest first, so each
rank gets a similar share of tokens). The sums are all-reduced (gloo on CPU, NCCL on CUDA);
every rank ends with the same stats, and ``mfprune profile`` writes them on rank 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta

import torch

from mfprune.errors import DataError, MfpruneError
from mfprune.profiling.data import TokenData

TIMEOUT_ENV = "MFPRUNE_DIST_TIMEOUT"  # seconds a rank waits for the others (default 1 hour)
_DEFAULT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class World:
    """This process's place among the ranks ``torchrun`` started."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_world() -> World | None:
    """The ``torchrun`` world from the environment; None for a lone process (``WORLD_SIZE``
    unset or 1)."""
    size = _env_int("WORLD_SIZE")
    if size is None or size <= 1:
        return None
    rank = _env_int("RANK")
    if rank is None or not 0 <= rank < size:
        raise MfpruneError(
            f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r}",
            hint="start distributed profiling with torchrun, which sets both",
        )
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK") or 0)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise MfpruneError(
            f"environment variable {name}={value!r} is not a number",
            hint="start distributed profiling with torchrun",
        ) from None


def timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return timedelta(seconds=_DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise MfpruneError(
            f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds",
            hint=f"e.g. {TIMEOUT_ENV}=600",
        )
    return timedelta(seconds=seconds)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the ranks (gloo on CPU, NCCL on CUDA) unless a process group is already up; leave
    it on exit if this call made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise MfpruneError(
            "this torch build has no torch.distributed", hint="run one process per job instead"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, rank=world.rank, world_size=world.size, timeout=timeout(), init_method="env://"
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_same_data(tokens: TokenData, model_fingerprint: str) -> None:
    """Every rank must have read the same data for the same model; raise DataError if not."""
    import torch.distributed as dist

    mine = (tokens.fingerprint, model_fingerprint)
    every: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    odd = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
    if odd:
        raise DataError(
            f"ranks {odd} read other data or another model than rank 0",
            hint="every rank must see the same --data and MODEL (a shared file system)",
        )


def rank_share(tokens: TokenData, world: World) -> TokenData:
    """This rank's chunks: every ``world.size``-th, dealt longest first."""
    order = sorted(range(len(tokens.chunks)), key=lambda i: -tokens.chunks[i].numel())
    mine = sorted(order[world.rank :: world.size])
    return replace(tokens, chunks=[tokens.chunks[i] for i in mine])


def all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
