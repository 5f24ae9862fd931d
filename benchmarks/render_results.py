"""Turn the files a GPU run of benchmarks/gpu_quick.py or gpu_suite.sh wrote into the project's results.

    python benchmarks/render_results.py FOLDER_OR_FILE...        (the output folders of the GPU runs)

reads every benchmark JSON among the inputs (benchmarks/gpu_quick.py's environment.json, bench_attention.py,
bench_reassemble.py, bench_rcu.py, bench_train.py, `dpt-fast bench`) and the GPU tests' junit XML, merges
them per device and date into benchmarks/results/<device>-<date>.json (merging into that file when it
exists: a stage run again replaces its benchmark; end-to-end rows are merged row by row, a measured row
never replaced by a skipped one), evaluates the performance targets of each area (attention, Reassemble,
residual conv unit, training step, end to end: the *_targets functions below, listed in RESULTS.md) as
met / not met / incomplete / not measured / not verified ("incomplete": every row measured meets it, but
rows it covers were skipped, failed or never reached, so it is not called met), and rewrites the
generated part of benchmarks/RESULTS.md (between its BEGIN/END markers) from every merged file in the
results folder, newest first.

Only GPU measurements are accepted: an input recorded on a CPU, under TRITON_INTERPRET=1 or by a
--smoke dry run is refused (exit status 2) unless --allow-non-gpu is given, and then only with an
explicit --results-dir and --markdown (the tests use that with fixtures; nothing of the kind may reach the
repository's RESULTS.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MARKDOWN = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- BEGIN GENERATED RESULTS (benchmarks/render_results.py; do not edit by hand) -->"
END = "<!-- END GENERATED RESULTS -->"
NO_RESULTS = ("**No GPU measurement exists yet.** The fused kernels have been checked for correctness on CPU "
              "only (Triton interpreter; the CUDA extension compiled but never executed), and no speed claim is "
              "made.")
KINDS = ("environment", "attention", "reassemble", "rcu", "train", "e2e_inference", "e2e_train")
TARGET_DEVICE = "H100"  # every target is stated for an H100, bf16, one run
# the areas with performance targets, in the order they are listed, and the benchmark that measures each
AREAS = {"attention": ("attention", "bench_attention.py"), "reassemble": ("Reassemble", "bench_reassemble.py"),
         "rcu": ("residual conv unit", "bench_rcu.py"), "train": ("training step", "bench_train.py"),
         "e2e_inference": ("end to end", "dpt-fast bench")}


# --- reading -------------------------------------------------------------------------------------

def kind_of(doc: dict) -> str | None:
    b = doc.get("benchmark")
    if b in ("environment", "attention", "reassemble", "rcu"):
        return b
    if b == "train_step":
        return "train"
    if b in ("e2e_inference", "e2e_train"):
        return b
    if "settings" in doc and "results" in doc and "environment" in doc:  # dpt-fast bench before "benchmark"
        return "e2e_train" if doc["settings"].get("train") else "e2e_inference"
    return None


def env_of(doc: dict) -> dict:
    """The dpt_fast.measure.environment() record of a benchmark document (top level or under "environment")."""
    env = doc.get("environment") if isinstance(doc.get("environment"), dict) else doc
    return {k: env.get(k) for k in ("device", "device_type", "dtype", "date", "versions", "git_commit", "gpu",
                                    "triton_interpret")}


def non_gpu_reason(doc: dict) -> str | None:
    env = env_of(doc)
    if doc.get("smoke") or (doc.get("settings") or {}).get("tiny"):
        return "a --smoke/--tiny dry run"
    if env.get("device_type") != "cuda":
        return f"recorded on {env.get('device_type')!r}, not a CUDA device"
    if env.get("triton_interpret"):
        return "recorded under TRITON_INTERPRET=1"
    return None


def read_junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0) or 0) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["time_s"] = round(sum(float(s.get("time", 0) or 0) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["failed_tests"] = failed
    return total


def collect(paths: list[Path]) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]], list[str]]:
    """(benchmark documents, junit summaries, problems) found under `paths`."""
    docs, junits, problems = [], [], []
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    for f in files:
        if f.suffix == ".json":
            try:
                doc = json.loads(f.read_text())
            except (json.JSONDecodeError, OSError) as e:
                problems.append(f"{f}: unreadable JSON ({e})")
                continue
            if isinstance(doc, dict) and kind_of(doc):
                docs.append((f, doc))
        elif f.suffix == ".xml":
            summary = read_junit(f)
            if summary is not None:
                junits.append((f, summary))
    return docs, junits, problems


# --- merging -------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "unknown").strip("-").lower() or "unknown"


def run_key(doc: dict) -> tuple[str, str]:
    env = env_of(doc)
    return env.get("device") or "unknown", (env.get("date") or "")[:10] or "undated"


def _e2e_row_key(r: dict) -> tuple:
    return (r.get("model"), r.get("size_label"), r.get("batch"), r.get("variant"))


def _measured(r: dict) -> bool:
    return r.get("latency_ms") is not None


def stored_run_path(results_dir: Path, device: str, date: str) -> Path:
    """The results file of this device's run: an existing one dated the day before or the same day (a
    run's stages may cross midnight), else <device>-<date>.json."""
    try:
        day = _dt.date.fromisoformat(date)
    except ValueError:
        return results_dir / f"{slug(device)}-{date}.json"
    for candidate in (day, day - _dt.timedelta(days=1)):
        path = results_dir / f"{slug(device)}-{candidate.isoformat()}.json"
        if path.exists():
            return path
    return results_dir / f"{slug(device)}-{date}.json"


def merge_e2e(old: dict | None, new: dict) -> dict:
    if not old:
        return new
    rows = {_e2e_row_key(r): r for r in old.get("results", [])}
    for r in new.get("results", []):
        k = _e2e_row_key(r)
        if k in rows and _measured(rows[k]) and not _measured(r):
            continue  # a measured row is never replaced by a skipped or failed one
        rows[k] = r
    merged = {**new, "results": list(rows.values())}
    settings = dict(new.get("settings", {}))
    for key in ("models", "sizes", "variants"):
        settings[key] = list(dict.fromkeys(list(old.get("settings", {}).get(key, [])) + list(settings.get(key, []))))
    merged["settings"] = settings
    merged["sources_merged"] = old.get("sources_merged", 1) + 1
    return merged


def merge(stored: dict | None, docs: list[tuple[Path, dict]], junits: list[tuple[Path, dict]]) -> dict:
    run = stored or {"benchmarks": {}, "gpu_tests": None, "sources": []}
    for path, doc in docs:
        kind = kind_of(doc)
        if kind.startswith("e2e"):
            run["benchmarks"][kind] = merge_e2e(run["benchmarks"].get(kind), doc)
        else:
            run["benchmarks"][kind] = doc
        run["sources"] = list(dict.fromkeys(run["sources"] + [path.name]))
    for path, summary in junits:
        run["gpu_tests"] = summary
        run["sources"] = list(dict.fromkeys(run["sources"] + [path.name]))
    envs = [env_of(d) for d in run["benchmarks"].values()]
    if envs:
        first = envs[0]
        run["device"], run["date"] = first.get("device"), (first.get("date") or "")[:10]
        run["versions"] = first.get("versions") or {}
        run["gpu"] = first.get("gpu")
        run["git_commits"] = sorted({e.get("git_commit") for e in envs if e.get("git_commit")})
    run["targets"] = evaluate_targets(run)
    run["rendered"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return run


# --- targets -------------------------------------------------------------------------------------

def _target(area, text, threshold, values, *, higher=True, verified=True, note="", missing="", gaps=()):
    """area: what the target is about (AREAS); values: [(ratio, label)] of the rows the target covers; gaps: rows it covers that produced no value
    (skipped, failed, out of memory, no baseline, a run cut short): with any, a target the measured rows
    meet is "incomplete", never "met"."""
    values = [(v, label) for v, label in values if v is not None]
    gaps = list(gaps)
    entry = {"area": area, "target": text, "threshold": threshold, "rows": len(values), "note": note,
             "missing_rows": gaps}
    if not values:
        entry.update(status="not measured", worst=None, worst_row=None, detail=missing or "no row measured")
        return entry
    worst, label = (min if higher else max)(values, key=lambda p: p[0])
    ok = worst >= threshold if higher else worst <= threshold
    entry.update(worst=round(worst, 3), worst_row=label, best=round((max if higher else min)(v for v, _ in values), 3))
    if not verified:
        entry.update(status="not verified", detail="the reference served some calls of the fused path")
    elif ok and gaps:
        entry.update(status="incomplete", detail=f"the {len(values)} rows measured meet it; {len(gaps)} it covers "
                     "did not measure: " + "; ".join(gaps[:3]) + ("; ..." if len(gaps) > 3 else ""))
    else:
        entry.update(status="met" if ok else "not met", detail="")
    return entry


_GAP_NOTE = re.compile(r"(skipped|failed|out of memory)\b")
CUT_SHORT = "the benchmark stopped before its end (rows it had not reached are unknown)"


def _gaps(doc: dict, covers) -> list[str]:
    """A benchmark's notes of rows that produced nothing (skipped, failed, out of memory) for which
    covers(note) is true, and, when the run did not finish, that fact."""
    gaps = [n for n in doc.get("notes", []) if _GAP_NOTE.match(n) and covers(n)]
    return gaps + ([] if doc.get("complete", True) else [CUT_SHORT])


def _note_matches(pattern: str, pick):
    """covers(note) for _gaps: the note names a row (regex groups) that pick(*groups) accepts."""
    def covers(note):
        m = re.search(pattern, note)
        return bool(m) and pick(*m.groups())
    return covers


def _verified(rows) -> bool:
    return all((r.get("fused_path") or {}).get("verified", False) for r in rows)


def _attention_row(r: dict) -> str:
    """An attention row's name: tokens, batch and, where the benchmark recorded it per row, heads."""
    return f"N={r['tokens']} B={r['batch']}" + (f" H={r['heads']}" if r.get("heads") is not None else "")


def attention_targets(doc: dict) -> list[dict]:
    rows = doc.get("kernel", [])

    def ratios(mode, pick):
        sel = [r for r in rows if pick(r["tokens"]) and r.get("vs_best_sdpa", {}).get(mode) is not None]
        return sel, [(r["vs_best_sdpa"][mode], f"{_attention_row(r)} (best SDPA: {r['best_sdpa'][mode]})")
                     for r in sel]
    out = []
    for text, mode, pick, thr in (("forward >= 1.0x the best SDPA backend, N >= 2305", "fwd", lambda n: n >= 2305, 1.0),
                                  ("forward >= 0.9x the best SDPA backend, N = 577", "fwd", lambda n: n == 577, 0.9),
                                  ("forward+backward >= 1.0x the best SDPA backend", "fwd_bwd", lambda n: True, 1.0)):
        sel, vals = ratios(mode, pick)
        gaps = _gaps(doc, _note_matches(r"\bkernel N=(\d+)", lambda n, pick=pick: pick(int(n))))
        gaps += [f"{_attention_row(r)}: no SDPA backend ran" for r in rows
                 if pick(r["tokens"]) and r.get("vs_best_sdpa", {}).get(mode) is None]
        out.append(_target("attention", text, thr, vals, verified=_verified(sel), gaps=gaps))
    blocks = doc.get("block", [])
    for mode, name in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        sel = [r for r in blocks if r.get("speedup_vs_timm", {}).get(mode) is not None]
        out.append(_target("attention", f"attention block >= 1.1x timm's Attention, {name}", 1.1,
                           [(r["speedup_vs_timm"][mode], _attention_row(r)) for r in sel],
                           verified=_verified(sel), gaps=_gaps(doc, lambda n: " block N=" in n)))
    return out


def _eager_and_compiled_targets(area, doc, label, note_row, big_from, eager, vs_compiled, fwd_bwd,
                                never_slower_at=None):
    """The targets bench_reassemble.py and bench_rcu.py share: forward vs eager and vs torch.compile at
    sizes >= big_from, (optionally never slower than eager at one size), forward+backward vs eager.
    eager, vs_compiled, fwd_bwd: (text, threshold); never_slower_at: (size, text); label(row): the row's
    name; note_row: a regex whose groups are the (size, mode) a benchmark note names."""
    rows = doc.get("results", [])

    def gaps(pick):
        return _gaps(doc, _note_matches(note_row, lambda s, m: pick(int(s), m)))
    fwd_big = [r for r in rows if r["mode"] == "fwd" and r["size"] >= big_from]
    compiled = [r for r in fwd_big if r.get("speedup_vs_compiled")]
    no_compiled = [f"{label(r)}: no compiled baseline" for r in fwd_big if not r.get("speedup_vs_compiled")]
    big_gaps = gaps(lambda s, m: m == "fwd" and s >= big_from)
    out = [
        _target(area, eager[0], eager[1], [(r["speedup_vs_eager"], label(r)) for r in fwd_big],
                verified=_verified(fwd_big), gaps=big_gaps),
        _target(area, vs_compiled[0], vs_compiled[1], [(r["speedup_vs_compiled"], label(r)) for r in compiled],
                verified=_verified(compiled),
                note=(f"{len(no_compiled)} of {len(fwd_big)} rows without a compiled baseline (over budget)"
                      if no_compiled and compiled else ""),
                missing="no compiled baseline finished (compile over budget or not run)", gaps=big_gaps + no_compiled),
    ]
    if never_slower_at is not None:
        size, text = never_slower_at
        small = [r for r in rows if r["size"] == size]
        out.append(_target(area, text, 1.0, [(r["speedup_vs_eager"], f"{label(r)} {r['mode']}") for r in small],
                           verified=_verified(small), gaps=gaps(lambda s, m: s == size)))
    fb = [r for r in rows if r["mode"] == "fwd+bwd"]
    out.append(_target(area, fwd_bwd[0], fwd_bwd[1], [(r["speedup_vs_eager"], label(r)) for r in fb],
                       verified=_verified(fb), gaps=gaps(lambda s, m: m == "fwd+bwd")))
    return out


def reassemble_targets(doc: dict) -> list[dict]:
    return _eager_and_compiled_targets(
        "Reassemble", doc, lambda r: f"{r['model']} {r['size']}^2 stage {r['stage']}",
        r" (\d+) stage \S+ (fwd\+bwd|fwd)\b", 1024,  # notes: "<model> <size> stage <label> <mode>"
        ("forward >= 2x the eager chain at 1024^2 and above", 2.0),
        ("forward >= 1.3x torch.compile of the chain at 1024^2 and above", 1.3),
        ("forward+backward >= 1.5x eager", 1.5),
        never_slower_at=(384, "never slower than eager at 384^2 (forward and forward+backward)"))


RCU_TARGET_CHANNELS = 256  # the width of DPT's fusion blocks, at which the RCU targets are stated


def rcu_targets(doc: dict) -> list[dict]:
    """The RCU targets over the rows at RCU_TARGET_CHANNELS (rows without a width are at it); rows of other
    widths (bench_rcu.py --preset da, --channels) are shown in the table but are not what the targets state."""
    at_width = {**doc, "results": [r for r in doc.get("results", [])
                                   if r.get("channels", RCU_TARGET_CHANNELS) == RCU_TARGET_CHANNELS],
                "notes": [n for n in doc.get("notes", []) if not re.search(r"\^2 batch \d+ \S+ \d+ channels\b", n)]}
    return _eager_and_compiled_targets(
        "residual conv unit", at_width, lambda r: f"{r['size']}^2 batch {r['batch']}",
        r"(\d+)\^2 batch \d+ (fwd\+bwd|fwd)\b", 96,  # notes: "<size>^2 batch <batch> <mode>[ <c> channels]"
        ("forward >= 1.5x eager (cuDNN) at maps of 96^2 and larger", 1.5),
        ("forward >= 1.2x torch.compile at maps of 96^2 and larger", 1.2),
        ("forward+backward >= 1.2x eager", 1.2))


TRAIN_MODELS = ("DPT-Hybrid", "DPT-Large")  # bench_train.py's labels of the models the targets name


def train_targets(doc: dict) -> list[dict]:
    out = []
    rows = doc.get("results", [])
    for model in dict.fromkeys(list(TRAIN_MODELS) + [r["model"] for r in rows]):  # the targets' models, then any other
        by = {r["variant"]: r for r in rows if r["model"] == model and r.get("step_ms")}
        fused, ref = by.get("fused"), by.get("reference")
        both = fused is not None and ref is not None
        verified = bool(fused and _verified([fused]))
        speed = [(ref["step_ms"] / fused["step_ms"], f"{model} batch {fused['batch']}")] if both else []
        memory = ([(fused["peak_memory_gib"] / ref["peak_memory_gib"], f"{model} batch {fused['batch']}")]
                  if both and fused.get("peak_memory_gib") and ref.get("peak_memory_gib") else [])
        out.append(_target("training step", f"{model}: training step >= 1.4x the reference eager", 1.4, speed, verified=verified))
        out.append(_target("training step", f"{model}: peak memory <= 0.7x the reference eager", 0.7, memory, higher=False,
                           verified=verified))
    return out


E2E_CONFIGS = (("large", "384", 16), ("large", "1536", 1), ("hybrid", "384", 16), ("hybrid", "1536", 1))
MODEL_LABELS = {"large": "DPT-Large", "hybrid": "DPT-Hybrid"}


def _best_fused(rows):
    fused = [r for r in rows if r["variant"] in ("fused", "fused+compile") and r.get("latency_ms")]
    return min(fused, key=lambda r: r["latency_ms"]) if fused else None


def e2e_targets(doc: dict) -> list[dict]:
    rows = doc.get("results", [])

    def group(model, size_label, batch):
        return [r for r in rows if r["model"] == model and r.get("size_label") == size_label and r["batch"] == batch]
    vs_hf, vs_compile, verified_hf, verified_c, notes, have_hf, have_compile = [], [], [], [], [], set(), set()
    for model, size_label, batch in E2E_CONFIGS:
        g = group(model, size_label, batch)
        best = _best_fused(g)
        label = f"{MODEL_LABELS[model]} {size_label}^2 b{batch}"
        hf = next((r for r in g if r["variant"] == "hf-sdpa" and r.get("latency_ms")), None)
        rc = next((r for r in g if r["variant"] == "reference+compile" and r.get("latency_ms")), None)
        if best and hf:
            vs_hf.append((hf["latency_ms"] / best["latency_ms"], f"{label} ({best['variant']})"))
            verified_hf.append(best)
            have_hf.add((model, size_label, batch))
        if best and rc:
            if rc.get("compile_mode", "max-autotune") == "max-autotune":
                vs_compile.append((rc["latency_ms"] / best["latency_ms"], f"{label} ({best['variant']})"))
                verified_c.append(best)
                have_compile.add((model, size_label, batch))
            else:
                notes.append(f"{label}: baseline compiled with mode={rc['compile_mode']} (max-autotune over budget): "
                             f"{rc['latency_ms'] / best['latency_ms']:.2f}x, not counted")
    four_k = [r for r in rows if r["model"] == "large" and r.get("size_label") in ("4k", "uhd")
              and r["variant"] in ("fused", "fused+compile") and r.get("mfu") is not None]
    best4k = max(four_k, key=lambda r: r["mfu"]) if four_k else None
    return [
        _target("end to end", "end to end >= 1.6x HF transformers' DPT (sdpa): Large and Hybrid, 384^2 b16 and 1536^2 b1", 1.6,
                vs_hf, verified=_verified(verified_hf),
                gaps=[f"{MODEL_LABELS[m]} {s}^2 b{b}" for m, s, b in E2E_CONFIGS if (m, s, b) not in have_hf]),
        _target("end to end", "end to end >= 1.25x torch.compile(max-autotune) of the reference, same configurations", 1.25,
                vs_compile, verified=_verified(verified_c), note="; ".join(notes),
                missing="no max-autotune compile of the reference finished",
                gaps=[f"{MODEL_LABELS[m]} {s}^2 b{b}" for m, s, b in E2E_CONFIGS if (m, s, b) not in have_compile]),
        _target("end to end", "DPT-Large at 4K: model FLOP utilisation >= 50% of the measured bf16 matmul peak", 0.5,
                [(best4k["mfu"], f"DPT-Large 4K ({best4k['variant']})")] if best4k else [],
                verified=_verified([best4k]) if best4k else True),
    ]


def evaluate_targets(run: dict) -> list[dict]:
    b = run["benchmarks"]
    out = []
    targets_of = {"attention": attention_targets, "reassemble": reassemble_targets, "rcu": rcu_targets,
                  "train": train_targets, "e2e_inference": e2e_targets}
    for kind, (area, what) in AREAS.items():
        if kind in b:
            out += targets_of[kind](b[kind])
        else:
            out.append({"area": area, "target": f"(every {area} target)", "status": "not measured",
                        "worst": None, "worst_row": None, "rows": 0, "note": "", "detail": f"{what} did not run"})
    device = run.get("device") or ""
    for t in out:
        t["device_matches_target"] = TARGET_DEVICE.lower() in device.lower()
    return out


# --- markdown ------------------------------------------------------------------------------------

def _f(value, spec=".2f", missing="-"):
    return missing if value is None else format(value, spec)


def _x(value):
    return "-" if value is None else f"{value:.2f}x"


def _status(t):
    s = t["status"]
    if s in ("met", "not met") and not t.get("device_matches_target", True):
        s += f" (not an {TARGET_DEVICE})"
    return {"met": "**met**", "not met": "not met"}.get(t["status"], t["status"]) + s[len(t["status"]):]


def render_run(run: dict, fixture: bool = False) -> str:
    """One run's section of RESULTS.md: what ran where, the targets, then each benchmark's table."""
    b = run["benchmarks"]
    lines = [f"### {run.get('device')}, {run.get('date')}", ""]
    if fixture:
        lines += ["**NOT A GPU MEASUREMENT: rendered from a fixture or dry run (--allow-non-gpu).**", ""]
    lines += _run_facts(run) + _targets_table(run["targets"])
    for kind, render in (("attention", _attention_tables), ("reassemble", _reassemble_table), ("rcu", _rcu_table),
                         ("train", _train_table), ("e2e_inference", _e2e_table)):
        if kind in b:
            lines += render(b[kind])
    return "\n".join(lines)


def _run_facts(run: dict) -> list[str]:
    """The run's device, versions, measured ceilings, benchmarks and GPU tests, as a list."""
    v = run.get("versions") or {}
    b = run["benchmarks"]
    gpu = run.get("gpu") or {}
    lines = [f"- device: {run.get('device')}" + (f" ({gpu.get('memory_gib')} GiB, sm_{gpu.get('capability', '').replace('.', '')}, "
                                                 f"{gpu.get('multiprocessors')} SMs)" if gpu else ""),
             f"- torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, "
             f"timm {v.get('timm')}, transformers {v.get('transformers')}, python {v.get('python')}, "
             f"dpt_fast {v.get('dpt_fast')} (commit {', '.join(run.get('git_commits') or ['?'])})"]
    ceilings = [d["ceilings"] for d in b.values() if isinstance(d.get("ceilings"), dict)]
    if ceilings:
        mm = [c["matmul_tflops"] for c in ceilings if c.get("matmul_tflops")]
        cp = [c["copy_tbps"] for c in ceilings if c.get("copy_tbps")]
        lines.append(f"- measured ceilings (each benchmark process measures its own): bf16 matmul "
                     f"{_f(min(mm) if mm else None, '.0f')}-{_f(max(mm) if mm else None, '.0f')} TFLOP/s, "
                     f"copy {_f(min(cp) if cp else None, '.2f')}-{_f(max(cp) if cp else None, '.2f')} TB/s")
    ran = [kind + ("" if b[kind].get("complete", True) else " (cut short)") for kind in KINDS if kind in b]
    lines.append(f"- what ran: {', '.join(ran) if ran else 'no benchmark'}; sources: {', '.join(run.get('sources', []))}")
    t = run.get("gpu_tests")
    status = (b.get("environment") or {}).get("gpu_tests_exit_status")
    if t:
        lines.append(f"- GPU tests (pytest -m gpu): {t['passed']} passed, {t['failures'] + t['errors']} failed, "
                     f"{t['skipped']} skipped in {t['time_s']} s"
                     + (f"; failed: {', '.join(t['failed_tests'][:10])}" if t["failed_tests"] else "")
                     + (" -- STOPPED at the stage's time budget: the rest did not run" if status == 124 else ""))
    else:
        lines.append("- GPU tests: no junit XML among the inputs")
    return lines


def _targets_table(targets: list[dict]) -> list[str]:
    lines = ["", "#### Targets", "",
             "| area | target | worst measured | status | worst row / note |", "|---|---|---|---|---|"]
    for tg in targets:
        worst = "-" if tg["worst"] is None else (f"{tg['worst']:.0%}" if "utilisation" in tg["target"] else f"{tg['worst']:.2f}x")
        note = "; ".join(x for x in (tg.get("worst_row") or "", tg.get("note") or "", tg.get("detail") or "") if x)
        lines.append(f"| {tg['area']} | {tg['target']} | {worst} | {_status(tg)} | {note} |")
    return lines


def _listed(value) -> str:
    """A benchmark setting that may be one value or a list of them (a --preset's head counts, widths)."""
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


def _fused_mark(r: dict) -> str:
    return "" if (r.get("fused_path") or {}).get("verified", True) else " (reference ran)"


def _attention_tables(d: dict) -> list[str]:
    lines = ["", f"#### Attention: {d.get('dtype')}, {_listed(d.get('heads'))} heads, head dim {d.get('head_dim')}; "
             f"TFLOP/s of dpt_fast and of each SDPA backend; ours / best SDPA", "",
             "| N | B | H | pass | dpt_fast | flash | efficient | cudnn | math | ours / best | of matmul peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d.get("kernel", []):
        heads = r.get("heads", d.get("heads"))
        for mode in ("fwd", "bwd", "fwd_bwd"):
            cells = [_f(r["tflops"].get(k, {}).get(mode), ".0f") for k in ("dpt_fast", "flash", "efficient", "cudnn", "math")]
            frac = (r.get("fraction_of_matmul_peak") or {}).get(mode)
            lines.append(f"| {r['tokens']} | {r['batch']} | {heads} | {mode} | " + " | ".join(cells)
                         + f" | {_x(r.get('vs_best_sdpa', {}).get(mode))} ({r.get('best_sdpa', {}).get(mode, '-')})"
                         + f" | {_f(frac, '.0%')}{_fused_mark(r)} |")
    if d.get("block"):
        lines += ["", "Attention block (qkv Linear, attention, proj) against timm's Attention (SDPA):", "",
                  "| N | B | H | timm fwd ms | ours fwd ms | fwd | timm fwd+bwd ms | ours fwd+bwd ms | fwd+bwd |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in d["block"]:
            ms, s = r["ms"], r["speedup_vs_timm"]
            lines.append(f"| {r['tokens']} | {r['batch']} | {r.get('heads', d.get('heads'))} | {ms['timm']['fwd']:.3f} | "
                         f"{ms['dpt_fast']['fwd']:.3f} | {_x(s['fwd'])} | {ms['timm']['fwd_bwd']:.3f} | "
                         f"{ms['dpt_fast']['fwd_bwd']:.3f} | {_x(s['fwd_bwd'])} |")
    return lines


_MODE_ORDER = {"fwd": 0, "fwd+bwd": 1}
_CONV_COLUMNS = " eager | compiled | fused | vs eager | vs compiled | fused TFLOP/s | fused TB/s |"


def _conv_row_cells(r: dict) -> str:
    """The measured cells Reassemble and RCU rows share: ms of eager, compiled and fused, the ratios, rates."""
    comp = _f(r.get("compiled_ms"), ".3f") if r.get("compiled_ms") is not None else (
        "over budget" if "over budget" in (r.get("compiled_note") or "") else "-")
    return (f" {r['eager_ms']:.3f} | {comp} | {r['fused_ms']:.3f}{_fused_mark(r)} | {_x(r['speedup_vs_eager'])} | "
            f"{_x(r.get('speedup_vs_compiled'))} | {_f(r.get('fused_tflops'), '.0f')} | {_f(r.get('fused_tbps'), '.2f')} |")


def _reassemble_table(d: dict) -> list[str]:
    batch = (d.get("args") or {}).get("batch", 1)
    lines = ["", f"#### Reassemble: ms, {d.get('dtype')}, batch {batch}", "",
             "| model | size | stage | mode |" + _CONV_COLUMNS, "|---|---|---|---|" + "---|" * 7]
    for r in sorted(d.get("results", []), key=lambda r: (r["model"], r["size"], str(r["stage"]),
                                                         _MODE_ORDER.get(r["mode"], 2))):
        lines.append(f"| {r['model']} | {r['size']} | {r['stage']} | {r['mode']} |" + _conv_row_cells(r))
    return lines


def _rcu_table(d: dict) -> list[str]:
    lines = ["", f"#### Residual conv unit pair: ms, {d.get('dtype')}, channels_last (targets: rows at "
             f"{RCU_TARGET_CHANNELS} channels)", "",
             "| map | batch | channels | mode |" + _CONV_COLUMNS, "|---|---|---|---|" + "---|" * 7]
    for r in sorted(d.get("results", []), key=lambda r: (r.get("channels", RCU_TARGET_CHANNELS), r["size"], r["batch"],
                                                         _MODE_ORDER.get(r["mode"], 2))):
        lines.append(f"| {r['size']}^2 | {r['batch']} | {r.get('channels', RCU_TARGET_CHANNELS)} | {r['mode']} |"
                     + _conv_row_cells(r))
    return lines


def _variant_name(r: dict) -> str:
    """A training or end-to-end row's variant, with its compile mode and a mark when the reference ran."""
    variant = r["variant"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else "")
    if r.get("fused_path") and not r["fused_path"].get("verified"):
        variant += " (reference ran)"
    return variant


def _train_table(d: dict) -> list[str]:
    lines = ["", f"#### Training step: {d.get('size')}^2, bf16 autocast, Adam; compile mode {d.get('compile_mode')}", "",
             "| model | variant | batch | step ms | images/s | peak GiB | TFLOP/s | MFU | vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d.get("results", []):
        ref = next((x for x in d["results"] if x["model"] == r["model"] and x["variant"] == "reference"
                    and x.get("step_ms")), None)
        if not r.get("step_ms"):
            lines.append(f"| {r['model']} | {_variant_name(r)} | {r.get('batch')} | {r.get('error')} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {_variant_name(r)} | {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                     f"{_f(r.get('peak_memory_gib'))} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('mfu'), '.0%')} | "
                     f"{_x(ref['step_ms'] / r['step_ms']) if ref else '-'} |")
    return lines


def _e2e_table(d: dict) -> list[str]:
    lines = ["", "#### End to end inference (`dpt-fast bench`): latency ms (speed-up of the best "
             "dpt-fast variant over each baseline in the target rows above)", "",
             "| model | size | batch | variant | latency ms | img/s | TFLOP/s | MFU | peak GiB | operators ran |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(("fused", "fused+compile", "reference", "reference+compile", "hf-sdpa"))}
    for r in sorted(d.get("results", []), key=lambda r: (r["model"], r["size"][0] * r["size"][1], order.get(r["variant"], 9))):
        size = f"{r['size'][0]}x{r['size'][1]}"
        if not r.get("latency_ms"):
            lines.append(f"| {r['model']} | {size} | {r['batch']} | {_variant_name(r)} | {r.get('error')} | | | | | |")
            continue
        impls = ", ".join(f"{op.replace('dpt_fast::', '')}:{'+'.join(sorted(c))}"
                          for op, c in sorted((r.get("implementations") or {}).items()))
        lines.append(f"| {r['model']} | {size} | {r['batch']} | {_variant_name(r)} | {r['latency_ms']:.2f} | "
                     f"{r['images_per_s']:.2f} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('mfu'), '.0%')} | "
                     f"{_f(r.get('peak_memory_gib'))} | {impls} |")
    return lines


def render_markdown(results_dir: Path, fixture: bool = False) -> str:
    runs = []
    for f in sorted(results_dir.glob("*.json")):
        try:
            run = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(run, dict) and "benchmarks" in run and "targets" in run:
            runs.append((run.get("date") or "", f, run))
    if not runs:
        return NO_RESULTS
    runs.sort(key=lambda p: (p[0], p[1].name), reverse=True)
    _, newest_path, newest = runs[0]
    parts = [f"Latest run: `benchmarks/results/{newest_path.name}`. Targets are stated for an {TARGET_DEVICE}, "
             "bf16, one run; a status is \"met\" only when every row the target covers was measured and meets it "
             "and the fused path was verified (no reference call inside a fused measurement); \"incomplete\": "
             "the rows measured meet it, others it covers did not measure.", "", render_run(newest, fixture)]
    if len(runs) > 1:
        parts += ["", "Earlier runs: " + ", ".join(f"`benchmarks/results/{p.name}`" for _, p, _ in runs[1:])]
    return "\n".join(parts)


def write_markdown(path: Path, generated: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{BEGIN}\n{generated}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# --- the command ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", type=Path, help="folders or files a GPU run wrote")
    ap.add_argument("--results-dir", type=Path, default=None, help=f"default {DEFAULT_RESULTS.relative_to(ROOT)}")
    ap.add_argument("--markdown", type=Path, default=None, help=f"default {DEFAULT_MARKDOWN.relative_to(ROOT)}")
    ap.add_argument("--allow-non-gpu", action="store_true",
                    help="accept CPU/interpreter/--smoke inputs (tests only; needs --results-dir and --markdown)")
    args = ap.parse_args(argv)
    if args.allow_non_gpu and (args.results_dir is None or args.markdown is None):
        print("render_results: --allow-non-gpu needs an explicit --results-dir and --markdown (never the "
              "repository's RESULTS.md)", file=sys.stderr)
        return 2
    results_dir = args.results_dir or DEFAULT_RESULTS
    md_path = args.markdown or DEFAULT_MARKDOWN

    docs, junits, problems = collect(args.inputs)
    for p in problems:
        print(f"render_results: {p}", file=sys.stderr)
    refused = [(f, non_gpu_reason(d)) for f, d in docs if non_gpu_reason(d)]
    if refused and not args.allow_non_gpu:
        for f, why in refused:
            print(f"render_results: refusing {f}: {why} (only GPU measurements go into the results)", file=sys.stderr)
        return 2
    if args.inputs and not docs and not junits:
        print("render_results: no benchmark JSON or junit XML among the inputs", file=sys.stderr)
        return 2

    groups: dict[tuple[str, str], list] = {}
    by_device: dict[str, list] = {}
    for f, d in docs:
        by_device.setdefault(run_key(d)[0], []).append((f, d))
    for device, group in by_device.items():  # one run per device: a run's stages may cross midnight
        groups[(device, min(run_key(d)[1] for _, d in group))] = group
    if junits and not groups:
        print("render_results: junit XML without any benchmark JSON: nothing to attach it to", file=sys.stderr)
        return 2
    results_dir.mkdir(parents=True, exist_ok=True)
    for (device, date), group in sorted(groups.items()):
        path = stored_run_path(results_dir, device, date)
        stored = json.loads(path.read_text()) if path.exists() else None
        run = merge(stored, group, junits)
        if refused:
            run["fixture"] = True
        path.write_text(json.dumps(run, indent=1, default=str) + "\n")
        met = sum(t["status"] == "met" for t in run["targets"])
        print(f"render_results: wrote {path} ({len(group)} benchmark file(s); targets met: {met} of {len(run['targets'])})")
        for t in run["targets"]:
            print(f"  {t['area']}: {t['target']}: {t['status']}"
                  + (f" (worst {t['worst']} at {t['worst_row']})" if t.get("worst") is not None else ""))
    write_markdown(md_path, render_markdown(results_dir, fixture=bool(refused)))
    print(f"render_results: rewrote the generated part of {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
