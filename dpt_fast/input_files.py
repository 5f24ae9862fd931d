"""Which files a batch-inference run reads, and the output names it gives them.

`collect_inputs` turns command-line style inputs (files, folders searched recursively, glob patterns)
into image files, `collect_videos` into video files or folders of frames; `plan_jobs` names each
one's outputs, mirroring the input names; `shard` splits the sorted jobs between processes.
"""
from __future__ import annotations

import glob
import itertools
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import image_io

# Video files by name (dpt_fast.video reads them; the names are here so that choosing inputs needs no
# video library).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts",
                    ".m2ts", ".wmv", ".flv", ".3gp", ".ogv")


def is_video_name(path) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


FORMAT_SUFFIX = {"png16": ".png", "png": ".png", "pfm": ".pfm", "npy": ".npy", "color": "-color.png"}


class UsageError(Exception):
    """A problem with what was asked (inputs, output folder, options): reported in one line."""


class OutputConflict(Exception):
    """An output path holds a file this tool did not write."""


@dataclass
class Job:
    src: Path
    rel: str                                     # output name relative to OUT, without extension (posix)
    outputs: dict = field(default_factory=dict)  # format -> Path


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob pattern that contain no wildcard."""
    parts = Path(pattern).parts
    base = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def _is_regular(path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _walk(folder: Path, exclude: Path | None, skipped: list | None = None, visited: set | None = None,
          accept=image_io.is_image_name):
    """Image files (or files whose name `accept` takes) under `folder`, recursively, sorted; hidden
    entries and the output folder are left out. Links to folders are followed, but every real folder is
    entered once (a link loop ends); only regular files are yielded (a FIFO or device named like an
    image is listed in `skipped`)."""
    visited = set() if visited is None else visited
    try:
        info = os.stat(folder)
    except OSError as e:
        if skipped is not None:
            skipped.append((str(folder), f"cannot enter: {e.strerror or e}"))
        return
    if (info.st_dev, info.st_ino) in visited:
        return
    visited.add((info.st_dev, info.st_ino))
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        if skipped is not None:
            skipped.append((str(folder), f"cannot list: {e.strerror or e}"))
        return
    subfolders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(folder) / entry.name
        try:
            is_dir = entry.is_dir()  # follows links
        except OSError:
            is_dir = False
        if is_dir:
            if exclude is None or path.resolve() != exclude:
                subfolders.append(path)
        elif accept(entry.name):
            if _is_regular(path):
                yield path
            elif skipped is not None:
                skipped.append((str(path), "not a regular file (a FIFO, socket, device or broken link)"))
    for sub in subfolders:
        yield from _walk(sub, exclude, skipped, visited, accept)


def collect_inputs(inputs, exclude=None, skipped: list | None = None
                   ) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """INPUT arguments -> ([(file, relative name with extension)], [(argument, problem)]).

    A folder contributes its image files recursively, named relative to the folder; a file is named by
    its file name; a glob's matches are named relative to the pattern's leading non-wildcard folders.
    The same file given twice is kept once. Problems: a missing input, a named file that is not a
    regular file, a folder or pattern without images. Files met in folders but left out (not regular
    files) are appended to `skipped` as (path, reason).
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, tuple[Path, str]] = {}
    problems = []

    def add(path: Path, rel: Path):
        key = path.resolve()
        if key not in found:
            found[key] = (path, rel.as_posix())
        return 1

    for arg in inputs:
        arg = os.fspath(arg)
        path = Path(arg).expanduser()
        if path.is_dir():
            if not sum(add(f, f.relative_to(path)) for f in _walk(path, exclude, skipped)):
                problems.append((arg, "the folder holds no image files (" + ", ".join(image_io.IMAGE_EXTENSIONS) + ")"))
        elif os.path.lexists(path) and not glob.has_magic(arg):
            if _is_regular(path):
                add(path, Path(path.name))
            else:
                problems.append((arg, "not a regular file (a FIFO, socket, device or broken link)"))
        elif glob.has_magic(arg):
            base = _glob_base(os.path.expanduser(arg))
            n_images = 0
            for m in map(Path, sorted(glob.glob(os.path.expanduser(arg), recursive=True))):
                if m.is_dir():
                    n_images += sum(add(f, f.relative_to(base)) for f in _walk(m, exclude, skipped))
                elif image_io.is_image_name(m) and not m.name.startswith("."):
                    if exclude is not None and exclude in m.resolve().parents:
                        continue
                    if _is_regular(m):
                        n_images += add(m, m.relative_to(base) if base != Path(".") else m)
                    elif skipped is not None:
                        skipped.append((str(m), "not a regular file"))
            if not n_images:
                problems.append((arg, "the pattern matches no image"))
        else:
            problems.append((arg, "no such file or directory"))
    return list(found.values()), problems


def collect_videos(inputs, exclude=None, sequence: bool = False, skipped: list | None = None
                   ) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """INPUT arguments -> ([(video file or frame folder, relative name)], [(argument, problem)]).

    Without `sequence`: video files (by extension: .mp4, .mkv, .mov, .avi, .webm, ...) named directly,
    found recursively in folders (named relative to the folder) or matched by globs. With `sequence`:
    every folder argument (or folder a glob matches) is one sequence of frames, named by the folder's
    name; video files are taken as they are. Problems: a missing input, an argument that gives no
    video (or, with `sequence`, a file that is not a video).
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, tuple[Path, str]] = {}
    problems = []

    def add(path: Path, rel: str) -> int:
        found.setdefault(path.resolve(), (path, rel))
        return 1

    def take(path: Path, rel_base: Path | None) -> int:
        if path.is_dir():
            if sequence:  # the frames are the image files directly inside
                has_frames = any(not f.name.startswith(".") and image_io.is_image_name(f.name) and _is_regular(f)
                                 for f in path.iterdir())
                return add(path, path.resolve().name) if has_frames else 0
            return sum(add(f, f.relative_to(path).as_posix()) for f in _walk(path, exclude, skipped,
                                                                           accept=is_video_name))
        if is_video_name(path.name) and _is_regular(path):
            rel = path.relative_to(rel_base).as_posix() if rel_base not in (None, Path(".")) else path.name
            return add(path, rel)
        return 0

    for arg in inputs:
        arg = os.fspath(arg)
        path = Path(arg).expanduser()
        if glob.has_magic(arg) and not os.path.lexists(path):
            base = _glob_base(os.path.expanduser(arg))
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(arg), recursive=True))]
            if not sum(take(m, base) for m in matches if not m.name.startswith(".")):
                problems.append((arg, "the pattern matches no " + ("folder or video" if sequence else "video")))
        elif path.is_dir():
            if not take(path, None):
                problems.append((arg, "the folder holds no image files directly inside (the frames of --sequence)"
                                 if sequence else
                                 "the folder holds no video files (" + ", ".join(VIDEO_EXTENSIONS) + ")"))
        elif os.path.lexists(path):
            if not take(path, None):
                problems.append((arg, "not a folder of frames or a video file" if sequence else
                                 "not a video file (by its extension)"))
        else:
            problems.append((arg, "no such file or directory"))
    return list(found.values()), problems


# --- output names --------------------------------------------------------------------------------

def _qualified(src, name: str, depth: int) -> str:
    """`name` prefixed with the `depth` folders above the part of `src` that `name` already names
    (a/x.jpg and b/x.jpg, both named x from the input folders a and b, become a/x and b/x)."""
    parts = Path(os.path.abspath(src)).parts[1:]  # without the root
    above = parts[:max(0, len(parts) - len(Path(name).parts))]
    return "/".join([*above[len(above) - depth:], name]) if depth <= len(above) else ""


def plan_jobs(items, out_dir, formats) -> list[Job]:
    """Output names: the input's relative name without its extension (subfolders kept). Inputs that
    share a stem in one folder (coffee.jpg and coffee.png) keep their whole file name instead
    (coffee.jpg.png and coffee.png.png for 16-bit PNGs; coffee.jpg-color.png for colour pictures);
    inputs of one relative name from several input folders (`predict a b` with a/x.jpg and b/x.jpg)
    are prefixed with their folders' names (a/x.png, b/x.png). Names are compared case-insensitively,
    so that no two inputs share an output file on any file system."""
    out_dir = Path(out_dir)
    stems: dict[str, set] = {}
    for _, rel in items:
        stems.setdefault(os.path.splitext(rel)[0].casefold(), set()).add(rel.casefold())
    names = []
    for _, rel in items:
        stem = os.path.splitext(rel)[0]
        names.append(rel if len(stems[stem.casefold()]) > 1 else stem)

    def outputs(name):
        return {fmt: out_dir / (name + FORMAT_SUFFIX[fmt]) for fmt in formats}

    def claimed(name):
        return {str(p).casefold() for p in outputs(name).values()}

    # Names that still collide (one relative name from two folders; "x-color.jpg" against x.jpg's colour
    # output) are qualified by parent folders, else numbered; deterministic in the items, as sharding needs.
    counts: dict[str, int] = {}
    for name in names:
        for path in claimed(name):
            counts[path] = counts.get(path, 0) + 1
    taken: set[str] = set()
    for i in sorted(range(len(items)), key=lambda i: (names[i], str(items[i][0]))):
        if any(counts[p] > 1 for p in claimed(names[i])):
            src, name = items[i][0], names[i]
            depths = range(1, len(Path(os.path.abspath(src)).parts))
            candidates = itertools.chain((_qualified(src, name, d) for d in depths),
                                         (f"{name}~{n}" for n in itertools.count(2)))
            names[i] = next(c for c in candidates if c and not claimed(c) & taken
                            and not any(p in counts for p in claimed(c)))
            taken |= claimed(names[i])
    jobs = [Job(src, name, outputs(name)) for (src, _), name in zip(items, names)]
    jobs.sort(key=lambda j: (j.rel, str(j.src)))
    return jobs


def check_outputs(jobs: list[Job], inputs, out_dir) -> None:
    """Refuse an output folder that is an input folder (a re-run would read the outputs as inputs)
    or whose outputs would overwrite an input image (`predict photos/a.png -o photos`)."""
    out = Path(out_dir).expanduser().resolve()
    for arg in inputs:
        path = Path(os.fspath(arg)).expanduser()
        if path.is_dir() and path.resolve() == out:
            raise UsageError(f"-o {out_dir} is the input folder {os.fspath(arg)}: the next run would read the "
                             "outputs as inputs; choose another output folder (a subfolder of the input is fine)")
    sources = {s for s in (Path(job.src).resolve() for job in jobs) if out in s.parents}
    for job in jobs if sources else ():  # only inputs inside the output folder can be overwritten
        for path in job.outputs.values():
            if path.resolve() in sources:
                raise UsageError(f"the output {path} would overwrite an input image of that name: choose "
                                 "another output folder with -o")


def shard(jobs: list, rank: int, world: int) -> list:
    """The rank's share of the sorted job list: job i goes to rank i % world."""
    return [job for i, job in enumerate(jobs) if i % world == rank]
