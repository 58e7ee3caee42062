"""Data-parallel training under torchrun with PyTorch's own DistributedDataParallel.

`torchrun --nproc_per_node N train.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK; a plain
`python train.py` runs as a world of one, and every helper here is then a no-op.

Every process trains: missing teachers too, each process its shard of every batch, exactly as it
trains the student, so no process idles through a teacher's hours. Processes wait for one another
only briefly: at each step's gradient all-reduce, while process 0 computes a view of the teacher-logit
cache or writes a file the others then read (`main_process_first`). A wait longer than the run's
--dist_timeout (default 30 minutes) fails the run with an error instead of hanging; a process that
fails tells the others at once (see `main_process_first`; a peer that exits also breaks gloo's
connections, and torchrun stops the rest of an NCCL job).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kd.errors import UserError



@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device, timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), whose collectives fail after
    `timeout_minutes` of waiting; a world of one otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_device(device: torch.device, world: World) -> torch.device:
    """Each process of a multi-GPU run gets its own GPU."""
    if device.type == "cuda" and world.size > 1:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (in place)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_tensors(tensors) -> None:
    """Rank 0's values of `tensors`, in place on every process."""
    if active():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def broadcast(value):
    """Rank 0's `value`, on every process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_process_first(world: World):
    """Rank 0 runs the block first (training teachers, building caches), then the others reuse its files.

    Rank 0 ends the block by broadcasting how it went, so when it fails (a missing teacher, a full
    disk, a bad config) the waiting processes stop at once with its error instead of waiting out the
    collective timeout.
    """
    if not world.is_main:
        failure = broadcast(None)
        if failure is not None:
            raise UserError(f"process 0 failed: {failure}")
        yield
        return
    try:
        yield
    except BaseException as err:
        if active():
            broadcast(str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}")
        raise
    broadcast(None)


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
