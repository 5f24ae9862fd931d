"""OUT/.dpt-fast-manifest.jsonl: the record of which outputs batch inference wrote, and how.

It is what makes a re-run safe: an output is "done" only if it was written from the same model and
settings, and a file in the output folder that dpt-fast did not write is never replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import image_io
from .input_files import Job
from .transforms import LABEL_OFFSET

MANIFEST_NAME = ".dpt-fast-manifest.jsonl"


class OutputConflict(Exception):
    """An output path holds a file this tool did not write."""


def _identity(info: os.stat_result) -> list[int]:
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OutputManifest:
    """OUT/.dpt-fast-manifest.jsonl: one JSON line per output written, appended just before the
    output takes its final name: {"output": name in OUT, "file": [size, mtime_ns, inode], "sha256":
    the bytes' digest, "settings": {model, size, task, dtype, format, ...}}.

    A file in OUT is this tool's if a record matches it: its size, modification time and inode, or
    (a file touched or copied since) its size and SHA-256; a file put there by someone else under the
    same name matches neither. It is done if that record's settings are the ones asked for now. Lines
    are appended with O_APPEND in one write each, so several processes (torchrun ranks) and threads
    may record at once; a line cut short by a kill is ignored on reading."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST_NAME
        self._lock = threading.Lock()
        self.records: dict[str, list[dict]] = {}
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            text = ""
        for line in text.splitlines():
            try:
                record = json.loads(line)
                name, identity = record["output"], record["file"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill, or not ours
            if isinstance(name, str) and isinstance(identity, list) and len(identity) == 3:
                self.records.setdefault(name, []).append(record)

    def _name(self, path) -> str:
        return Path(os.path.relpath(path, self.out_dir)).as_posix()

    def record_for(self, path) -> dict | None:
        """The record of the file now at `path` if this tool wrote it, else None (also when absent)."""
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        records = self.records.get(self._name(path), [])
        if not stat.S_ISREG(info.st_mode) or not records:
            return None
        identity = _identity(info)
        for record in reversed(records):
            if record["file"] == identity:
                return record
        same_size = [r for r in reversed(records) if r["file"][0] == info.st_size and r.get("sha256")]
        if same_size:
            digest = _file_sha256(path)
            for record in same_size:
                if record["sha256"] == digest:
                    return record
        return None

    def add(self, path, written: os.stat_result, settings: dict, sha256: str | None = None) -> None:
        record = {"output": self._name(path), "file": _identity(written), "sha256": sha256, "settings": settings}
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self.records.setdefault(record["output"], []).append(record)

    def compact(self) -> None:
        """Rewrite the manifest (atomically) with only the records of files still in place; for a
        single process, when no other is appending."""
        keep = []
        for name in sorted(self.records):
            record = self.record_for(self.out_dir / name)
            if record is not None:
                keep.append(json.dumps(record, sort_keys=True) + "\n")
        if keep or self.path.exists():
            image_io.atomic_write_bytes(self.path, "".join(keep).encode("utf-8"))


@dataclass
class Plan:
    todo: list           # jobs to compute
    done: list           # jobs whose outputs are all this tool's, from the same settings
    conflicts: list      # (job, why): an output path holds a file this tool did not write


def plan_work(jobs: list[Job], manifest: OutputManifest, settings: dict, overwrite: bool = False) -> Plan:
    """Sort jobs into done, to do, and conflicts (never written over)."""
    plan = Plan([], [], [])
    for job in jobs:
        foreign = [p for p in job.outputs.values() if os.path.lexists(p) and manifest.record_for(p) is None]
        if foreign:
            plan.conflicts.append((job, f"{foreign[0]} exists and was not written by dpt-fast: left as it is and "
                                        "this input skipped (move that file, or choose another -o)"))
            continue
        finished = all((r := manifest.record_for(p)) is not None and r.get("settings") == dict(settings, format=fmt)
                       for fmt, p in job.outputs.items())
        (plan.done if finished and not overwrite else plan.todo).append(job)
    return plan


def model_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 over the model's configuration and state dict (names, dtypes, shapes, bytes):
    the model's identity in the manifest when no file fingerprint is given."""
    h = hashlib.sha256(json.dumps(getattr(model, "config", {}) or {}, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:32]


def settings_record(model_id: str, size, segmentation: bool, dtype=None, tile=None, tile_overlap=0.25,
                    label_offset: int = LABEL_OFFSET, extra: dict | None = None) -> dict:
    """What the manifest records about how an output was made (with its format, added per file).
    `extra`: more JSON fields, e.g. what the values mean ({"output": "metric_depth", "unit": "m"})."""
    record = {"model": model_id, "size": "native" if size is None else int(size),
              "task": "segmentation" if segmentation else "depth",
              "dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32"}
    if tile:
        record.update(tile=int(tile), tile_overlap=float(tile_overlap))
    if segmentation:
        record["label_offset"] = int(label_offset)
    record.update(extra or {})
    return record


def file_fingerprint(path) -> str:
    """A model file's or folder's identity for the manifest: SHA-256 over the resolved path, size and
    modification time of the file (of a folder: of each file directly in it). Cheap: nothing is read."""
    path = Path(path).expanduser().resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        info = f.stat()
        h.update(f"{f}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return f"{path.name}@sha256:{h.hexdigest()[:24]}"
