"""Atomic file writes, and finding the temporary files that an interrupted write left behind.

Every file dpt_fast writes for a user (predictions, manifests, saved models, training checkpoints) goes
through `atomic_write`: the content is written to a hidden temporary file in the destination folder,
`.<name>.<pid>-<8 hex>.tmp`, which is then renamed over the destination with `os.replace`. A reader
therefore sees the old file or the new one, never a part; an interrupted write removes its temporary
file, and one killed outright leaves a temporary file that `stale_temporaries` finds once its writing
process is gone. New files get the mode of any new file (0666 less the umask).
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes", "temporary_path", "TEMPORARY_NAME", "stale_temporaries",
           "process_alive", "new_file_mode"]

# The name of a temporary file: the final name, the writing process's id, 8 random hex digits.
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temporary_path(path) -> Path:
    """A fresh temporary name beside `path`, for this process."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def atomic_write(path, write: Callable[[Path], None], *, durable: bool = False,
                 before_replace: Callable[[Path], None] | None = None) -> None:
    """Create or replace `path` with what `write(temporary_path)` writes to the temporary file.

    `durable`: flush the temporary file to disk before the rename (checkpoints and saved models; not
    worth it for each of thousands of predictions). `before_replace(temporary_path)`, if given, runs
    once the content is complete and before it takes the final name (os.replace keeps the inode, size
    and modification time, so its os.stat is the final file's); raising there leaves `path` untouched.
    On any failure or interrupt the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # whatever mode the writer (e.g. safetensors) gave it
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes, before_replace: Callable[[Path], None] | None = None, *,
                       durable: bool = False) -> None:
    """`atomic_write` of a bytes object."""
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(data)
    atomic_write(path, write, durable=durable, before_replace=before_replace)


def stale_temporaries(folder, recursive: bool = True) -> list[Path]:
    """The temporary files of `atomic_write` under `folder` (recursively unless told otherwise; links
    not followed) whose writing process no longer runs on this machine: leftovers of a killed run,
    safe to delete."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            match = TEMPORARY_NAME.match(name)
            if match and not process_alive(int(match.group("pid"))):
                found.append(Path(root) / name)
        if not recursive:
            break
    return sorted(found)


def new_file_mode() -> int:
    """The mode any new file of this process gets: 0666 less the umask (read without changing it
    where Linux tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (True when that cannot be ruled out)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or a PID we cannot ask about): leave its file
    return True
