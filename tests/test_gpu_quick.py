"""benchmarks/gpu_quick.py, the quick GPU check, as a CPU dry run (--smoke): every section runs (the
Triton interpreter, tiny shapes, the GPU tests collected and skipped, no extension build), exactly the
files its docstring lists are written (no temporary file left), and render_results.py refuses them as not
measured on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_every_section_and_the_files_it_lists(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("DPT_FAST_AUTOTUNE",)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_quick.py", "--smoke", "--out", str(out),
                           "--budget-s", "1500"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == {"gpu-quick.log", "environment.json", "junit-gpu-quick.xml", "attention.json",
                          "reassemble.json", "rcu.json", "e2e.json"}, (files, log[-3000:])
    doc = json.loads((out / "environment.json").read_text())
    assert doc["benchmark"] == "environment" and doc["smoke"] is True
    sections = {s["section"]: s for s in doc["quick"]["sections"]}
    assert list(sections) == ["install", "environment", "correctness", "bench-attention", "bench-reassemble",
                              "bench-rcu", "end-to-end"], sections
    not_ok = {n: (s["status"], s.get("note", "")[-600:]) for n, s in sections.items() if s["status"] != "ok"}
    assert not not_ok, not_ok
    assert proc.returncode == 0, log[-3000:]
    suites = {s.get("name") for s in ET.parse(out / "junit-gpu-quick.xml").getroot().iter("testsuite")}
    assert suites == {"attention", "reassemble"}, suites
    for name in ("attention", "reassemble", "rcu"):
        assert json.loads((out / f"{name}.json").read_text())["smoke"] is True, name
    render = subprocess.run([sys.executable, "benchmarks/render_results.py", str(out), "--results-dir",
                             str(tmp_path / "results"), "--markdown", str(tmp_path / "RESULTS.md")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert render.returncode == 2, render.stdout + render.stderr  # a dry run is never a measurement
