"""Where this process stands among the processes of a run: rank, world size and local rank, read
from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) the same way by every command.

Without torchrun the run is one process (rank 0 of 1). LOCAL_RANK, which torchrun always sets, falls
back to RANK when another launcher sets only RANK and WORLD_SIZE (one machine: the two are equal).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Place", "process_place"]


@dataclass(frozen=True)
class Place:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes what a run writes once (logs, summaries)."""
        return self.rank == 0


def _integer(environ, name: str, default: int) -> int:
    text = (environ.get(name) or "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; "
                         "unset them to run one process)") from None


def process_place(environ=None) -> Place:
    """This process's Place from the environment (`environ`: os.environ unless given); a ValueError
    that names the variables when they do not describe a run."""
    environ = os.environ if environ is None else environ
    world = _integer(environ, "WORLD_SIZE", 1)
    rank = _integer(environ, "RANK", 0)
    local = _integer(environ, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world} and LOCAL_RANK={local} are inconsistent "
                         "(0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
    return Place(rank, world, local)
