"""Where this process stands among the processes of a run, and the device it runs on: rank, world
size, local rank and local world size read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR) the same way by every command, and one rule for the CUDA device.

Without torchrun the run is one process (rank 0 of 1). LOCAL_RANK, which torchrun always sets, falls
back to RANK when another launcher sets only RANK and WORLD_SIZE (one machine: the two are equal);
LOCAL_WORLD_SIZE falls back to WORLD_SIZE the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Place", "process_place", "rendezvous_set", "pick_device"]


@dataclass(frozen=True)
class Place:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int | None = None  # processes on this machine; None: all of them (`world`)

    def __post_init__(self):
        if self.local_world is None:
            object.__setattr__(self, "local_world", self.world)

    @property
    def main(self) -> bool:
        """The process that writes what a run writes once (logs, summaries)."""
        return self.rank == 0


def _integer(environ, name: str, default: int, error) -> int:
    text = (environ.get(name) or "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise error(f"{name}={text!r} is not an integer (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; "
                    "unset them to run one process)") from None


def process_place(environ=None, *, error: type[Exception] = ValueError) -> Place:
    """This process's Place from the environment (`environ`: os.environ unless given). Variables that do
    not describe a run raise `error` (a command passes its usage error) with a message naming them."""
    environ = os.environ if environ is None else environ
    world = _integer(environ, "WORLD_SIZE", 1, error)
    rank = _integer(environ, "RANK", 0, error)
    local = _integer(environ, "LOCAL_RANK", rank, error)
    local_world = _integer(environ, "LOCAL_WORLD_SIZE", world, error)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise error(f"RANK={rank}, WORLD_SIZE={world} and LOCAL_RANK={local} are inconsistent "
                    "(0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
    return Place(rank, world, local, max(1, local_world))


def rendezvous_set(environ=None) -> bool:
    """Whether the environment names a rendezvous address (MASTER_ADDR, which torchrun sets): without
    it, processes cannot form a process group."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("MASTER_ADDR"))


def pick_device(requested: str | None, place: Place, *, error: type[Exception] = ValueError):
    """The torch.device a process at `place` runs on, for a `--device` value: None, "" or "auto" (CUDA when
    available, else the CPU), "cpu", "cuda" or "cuda:N". `error` is raised for a device that cannot be used.

    "cuda" without an index: in a run of several processes, GPU LOCAL_RANK modulo the visible devices.
    torchrun starts LOCAL_RANK 0 .. n-1 on each machine for its n GPUs; the modulo keeps that when a
    launcher shows each process only its own GPU (CUDA_VISIBLE_DEVICES of one device: LOCAL_RANK 3 is
    then cuda:0, not an invalid ordinal). A single process takes the current CUDA device (0 unless a
    caller of the Python API chose another with torch.cuda.set_device)."""
    import torch
    if requested in (None, "", "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise error(f"device {requested!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise error(f"device {requested}: CUDA is not available on this machine")
    if device.index is None:
        index = place.local_rank % torch.cuda.device_count() if place.world > 1 else torch.cuda.current_device()
        device = torch.device("cuda", index)
    elif device.index >= torch.cuda.device_count():
        raise error(f"device {requested}: this machine shows {torch.cuda.device_count()} CUDA device(s)")
    return device
