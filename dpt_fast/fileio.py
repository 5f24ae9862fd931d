"""Atomic file writes, and finding the temporary files that an interrupted write left behind.

Every file dpt_fast writes for a user (predictions, manifests, saved models, training checkpoints) goes
through `atomic_write`: the content is written to a hidden temporary file in the destination folder,
`.<name>.<pid>-<8 hex>.tmp`, which is then renamed over the destination with `os.replace`. A reader
therefore sees the old file or the new one, never a part; an interrupted write removes its temporary
file, and one killed outright leaves a temporary file that `stale_temporaries` finds once its writing
process is gone (and `remove_stale_temporaries` deletes, in the older namings too). New files get the
mode of any new file (0666 less the umask).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["atomic_write", "atomic_write_bytes", "temporary_path", "TEMPORARY_NAME", "stale_temporaries",
           "remove_stale_temporaries", "process_alive", "new_file_mode"]

# The name of a temporary file: the final name, the writing process's id, 8 random hex digits.
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
# The names older dpt_fast versions gave them: ".NAME.tmp-PID" (training) and ".NAME.tmp-PID-RANDOM"
# (save_model), and the fixed "NAME.tmp", which names no process. Too plain to be told apart from a user's
# files, they are recognised only for the final names a caller lists.
_OLDER_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+?)\.tmp-(?P<pid>\d+)(?:-\w+)?$")
_FIXED_TEMPORARY_NAME = re.compile(r"^\.?(?P<name>.+)\.tmp$")


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
    return _stale(folder, None, recursive=recursive, lock_held=False)


def remove_stale_temporaries(folder, names: Iterable[str] | None = None, *, recursive: bool = False,
                             min_age_s: float = 0.0, lock_held: bool = False) -> list[Path]:
    """Delete the temporary files that killed writes left in `folder` (not its subfolders unless
    `recursive`); returns their paths, sorted.

    `names`: the final file names whose temporary files may go, recognised in atomic_write's naming and
    in those of older versions (".NAME.tmp-PID", ".NAME.tmp-PID-RANDOM", the fixed "NAME.tmp"); None: the
    temporary files of any name, in atomic_write's naming only. A file whose writing process still runs
    on this machine is never deleted. `lock_held`: the caller holds a lock that keeps every other writer
    of these names out of `folder`, so a process id in a name that runs now is a reused one and only this
    process's own files are kept. `min_age_s` spares files modified less than that many seconds ago (a
    process id of another machine sharing the folder says nothing here). Links are neither followed nor
    deleted."""
    now = time.time()
    removed = []
    for path in _stale(folder, None if names is None else frozenset(names), recursive=recursive,
                       lock_held=lock_held):
        try:
            if min_age_s > 0 and now - os.lstat(path).st_mtime < min_age_s:
                continue
            path.unlink()
        except FileNotFoundError:  # removed meanwhile (by another process cleaning the same folder)
            continue
        removed.append(path)
    return removed


def _stale(folder, names: frozenset | None, *, recursive: bool, lock_held: bool) -> list[Path]:
    """The temporary files (regular files, not links) under `folder` whose writer cannot be running."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            is_temporary, pid = _temporary_writer(name, names)
            path = Path(root) / name
            if not is_temporary or path.is_symlink() or not path.is_file():
                continue
            if pid is None or (pid != os.getpid() and (lock_held or not process_alive(pid))):
                found.append(path)
        if not recursive:
            break
    return sorted(found)


def _temporary_writer(file_name: str, names: frozenset | None) -> tuple[bool, int | None]:
    """(whether `file_name` is the temporary file of a write to one of `names` -- any name when None, in
    atomic_write's naming only --, the id of its writing process, None when the name does not tell)."""
    match = TEMPORARY_NAME.match(file_name)
    if match and (names is None or match["name"] in names):
        return True, int(match["pid"])
    if names is None:
        return False, None
    match = _OLDER_TEMPORARY_NAME.match(file_name)
    if match and match["name"] in names:
        return True, int(match["pid"])
    match = _FIXED_TEMPORARY_NAME.match(file_name)
    return bool(match and match["name"] in names), None


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
