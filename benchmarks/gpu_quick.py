"""The quick GPU check: correctness of every fused kernel on the GPU, then the benchmark rows that decide
the targets, in one pass of under ten minutes on an H100/H200 that writes one small file per section.

    python benchmarks/gpu_quick.py --out OUT [--budget-s 450]     (or: bash benchmarks/gpu_suite.sh quick)
    python benchmarks/gpu_quick.py --out OUT --smoke              (CPU dry run of the same script; CI runs it)

Sections, in priority order; each runs inside its own time cap and what is left of --budget-s, and a
failure in one is recorded and the next runs:

  environment   device, versions, measured ceilings (bf16 matmul TFLOP/s, copy GB/s)
  correctness   GPU tests, DPT_FAST_AUTOTUNE=quick (one config per kernel variant, never benchmarked):
                attention bf16/fp16 at N = 577, 1370, 2305, 9217 (outputs and gradients against the fp32
                reference, large-magnitude inputs, TMA vs pointer kernels, strided input, determinism) and
                Reassemble (every readout of every DPT-Large/Hybrid stage, odd grids, the 4K stage 1) in two
                processes at once; then the residual conv unit's tests once the CUDA extension is built
  benchmarks    full autotuning: attention forward and forward+backward against every SDPA backend at 1370
                and 9217 tokens (and, where the section's time allows, 1370 tokens at batch 16: Depth
                Anything V2-Large on a batch of 518^2 images); Reassemble stage 1 (DPT-Large) at 512^2 and 1024^2 inputs (512: the
                multiple of 16 nearest 518) and the fusion block's RCU pair on 148^2 and 256^2 maps (the
                finest fusion maps of a 518^2 Depth Anything and a 1024^2 DPT input) at batch 1 and 8, each
                against eager PyTorch (cuDNN convolutions)
  end-to-end    DPT-Large 384x384 batch 16: fused vs reference vs Hugging Face transformers (sdpa)

From the start (once dpt_fast is importable), two background jobs: the CUDA extension (dpt_fast._C) builds for sm_90a only
(DPT_FAST_CUDA_GENCODE; CUTLASS from an installed nvidia-cutlass, DPT_FAST_CUTLASS_INCLUDE or a wheel in
.whl/), and a warm-up process runs the benchmarked kernels once at the benchmarked shapes, so that their
Triton compilations (one per autotune config) land in Triton's on-disk cache while the tests run; it is
stopped before the first timed row.

Files under --out (each rewritten, atomically, as its section goes, so a run cut short keeps what it did):
gpu-quick.log, environment.json (with the sections' status), junit-gpu-quick.xml (all GPU tests),
attention.json, reassemble.json, rcu.json, e2e.json. `python benchmarks/render_results.py OUT` turns them
into benchmarks/results/<device>-<date>.json and the tables of benchmarks/RESULTS.md.

--smoke runs every section on the CPU in a minute or two: Triton interpreter, tiny shapes, float32, no
extension build, CPU ceilings; the GPU tests collect and skip. Its files are marked as a dry run (render_results.py
refuses them). Exit status: 0 when every section ran and passed, 1 when one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # dpt_fast.fileio from this checkout, before the install section has run
from dpt_fast.fileio import atomic_write, atomic_write_bytes  # noqa: E402 -- plain Python, imports no torch

SM90_GENCODE = "-gencode=arch=compute_90a,code=sm_90a"

# GPU test selections (pytest -k), most telling first; the every-config and torch.compile tests stay in the
# full suite (tens of compiles each)
ATTENTION_TESTS = ("tests/test_attention_kernel.py", "gpu and not every_config and not torch_compile")
REASSEMBLE_TESTS = ("tests/test_reassemble_kernel.py", "gpu and not every_config and not torch_compile "
                                                        "and not not_the_current_one")
RCU_TESTS = ("tests/test_rcu_extension.py", "gpu and not sanitizer and not compile")


class Run:
    """The run's clock, log and record (environment.json's "quick" part)."""

    def __init__(self, out: Path, budget_s: float, smoke: bool):
        self.out, self.budget_s, self.smoke = out, budget_s, smoke
        self.t0 = time.monotonic()
        self.log_file = open(out / "gpu-quick.log", "a", buffering=1)
        self.sections: list[dict] = []
        self.environment: dict = {"benchmark": "environment", "smoke": smoke,  # the probe adds device, versions
                                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.work = Path(tempfile.mkdtemp(prefix="dpt-fast-quick-"))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def save(self) -> None:
        doc = {**self.environment, "quick": {"budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1),
                                             "sections": self.sections}}
        _write_json(self.out / "environment.json", doc)

    def section(self, name: str, cap_s: float, fn, *, min_s: float = 20.0) -> dict:
        """Run fn(seconds) within min(cap_s, time left); record its status, never raise. A --smoke run's caps
        are 4x: a shared CPU machine starts Python processes slowly, and the point there is the code path."""
        seconds = min(cap_s * (4 if self.smoke else 1), self.left())
        record = {"section": name, "started_s": round(self.elapsed(), 1), "cap_s": round(seconds, 1)}
        self.sections.append(record)
        if seconds < min_s:
            record.update(status="skipped", note=f"only {seconds:.0f} s of the budget left")
            self.log(f"=== {name}: skipped ({record['note']})")
            self.save()
            return record
        self.log(f"=== {name} (up to {seconds:.0f} s)")
        try:
            note = fn(seconds)
            record.update(status="ok", note=note or "")
        except Exception as e:  # noqa: BLE001 -- one section's failure must not end the run
            record.update(status="failed", note=f"{type(e).__name__}: {e}"[:800])
        record["wall_s"] = round(self.elapsed() - record["started_s"], 1)
        self.log(f"=== {name}: {record['status']} in {record['wall_s']} s {record.get('note', '')}")
        self.save()
        return record


def _write_json(path: Path, doc) -> None:
    atomic_write_bytes(path, json.dumps(doc, indent=1, default=str).encode())


# --- processes -----------------------------------------------------------------------------------

def _env(run: Run, **extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in extra.items()}}
    if run.smoke:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def start(run: Run, name: str, cmd: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
    """A child process in its own session, its output in the work folder."""
    log_path = run.work / f"{name}.log"
    run.log(f"start {name}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log_path


def stop(proc: subprocess.Popen, sig=signal.SIGINT, grace_s: float = 10.0) -> int:
    """Ask a child (and its process group) to stop, then kill it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


def wait(proc: subprocess.Popen, seconds: float) -> int | None:
    """The exit status, or None after `seconds` (the process is then stopped, pytest still writing its XML)."""
    try:
        return proc.wait(max(1.0, seconds))
    except subprocess.TimeoutExpired:
        stop(proc)
        return None


def tail(run: Run, log_path: Path, lines: int = 40) -> None:
    text = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    for line in text[-lines:]:
        run.log_file.write("    " + line + "\n")
    run.log_file.flush()


# --- setup ---------------------------------------------------------------------------------------

def _importable(run: Run) -> bool:
    return subprocess.run([sys.executable, "-c", "import dpt_fast.kernels"], cwd=ROOT, env=_env(run),
                          capture_output=True).returncode == 0


def ensure_installed(run: Run, seconds: float) -> str:
    """dpt_fast importable (an editable, pure-Python install where it is not): the extension is built in place
    by the background build, so nothing is reinstalled while tests run."""
    if _importable(run):
        return "dpt_fast importable"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e",
                           "."], cwd=ROOT, env=_env(run, DPT_FAST_BUILD_CUDA="0"), capture_output=True, text=True,
                          timeout=seconds)
    run.log_file.write(proc.stdout[-2000:] + proc.stderr[-2000:])
    if not _importable(run):
        raise RuntimeError("dpt_fast is not importable after `pip install --no-build-isolation -e .`")
    return "installed editable (pure Python)"


def _cutlass_include(run: Run) -> str | None:
    """CUTLASS headers for the build: DPT_FAST_CUTLASS_INCLUDE, the nvidia-cutlass package, or a wheel of it in
    .whl/ (unpacked into the work folder)."""
    if os.environ.get("DPT_FAST_CUTLASS_INCLUDE"):
        return os.environ["DPT_FAST_CUTLASS_INCLUDE"]
    import importlib.util
    if importlib.util.find_spec("cutlass_library") is not None:
        return None  # setup.py finds it
    wheels = sorted((ROOT / ".whl").glob("nvidia_cutlass-*.whl"))
    if not wheels:
        return None
    prefix = "cutlass_library/source/include/"
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(run.work / "cutlass", [n for n in z.namelist() if n.startswith(prefix)])
    return str(run.work / "cutlass" / prefix)


def start_extension_build(run: Run):
    """The CUDA extension built in place (python setup.py build_ext --inplace), sm_90a only."""
    env = _env(run, DPT_FAST_BUILD_CUDA="1", DPT_FAST_CUDA_GENCODE=os.environ.get("DPT_FAST_CUDA_GENCODE",
                                                                                     SM90_GENCODE),
               MAX_JOBS=os.environ.get("MAX_JOBS", "8"))
    include = _cutlass_include(run)
    if include:
        env["DPT_FAST_CUTLASS_INCLUDE"] = include
    return start(run, "build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], env)


def extension_registered(run: Run) -> bool:
    code = "import dpt_fast.kernels; from dpt_fast.ops.rcu import cuda_kernel_registered as r; raise SystemExit(0 if r() else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(run), capture_output=True).returncode == 0


# --- sections ------------------------------------------------------------------------------------

ENV_SCRIPT = r"""
import json, sys
import torch
from dpt_fast.measure import environment, measure_ceilings
smoke = sys.argv[1] == "1"
device = torch.device("cpu" if smoke else "cuda")
doc = {"benchmark": "environment", **environment(device, torch.bfloat16)}
doc["ceilings"] = measure_ceilings(device, torch.float32 if smoke else torch.bfloat16)
if device.type == "cuda":
    doc["capability"] = list(torch.cuda.get_device_capability(device))
    doc["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
print("ENV " + json.dumps(doc, default=str))
"""


def environment_section(run: Run, seconds: float) -> str:
    proc = subprocess.run([sys.executable, "-c", ENV_SCRIPT, "1" if run.smoke else "0"], cwd=ROOT, env=_env(run),
                          capture_output=True, text=True, timeout=seconds)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ENV ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"environment probe failed: {proc.stderr[-1500:]}")
    run.environment.update(json.loads(lines[-1][4:]))
    nvsmi = shutil.which("nvidia-smi")
    if nvsmi and not run.smoke:
        q = subprocess.run([nvsmi, "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                            "--format=csv,noheader"], capture_output=True, text=True)
        run.environment["nvidia_smi"] = q.stdout.strip()
    return json.dumps(run.environment.get("ceilings"), default=str)


def merge_junit(run: Run, parts: dict[str, Path]) -> None:
    """One junit file of every GPU test run so far (render_results.py reads it)."""
    root = ET.Element("testsuites")
    for name, path in parts.items():
        try:
            tree = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            continue
        for suite in ([tree] if tree.tag == "testsuite" else list(tree.iter("testsuite"))):
            suite.set("name", name)
            root.append(suite)
    atomic_write(run.out / "junit-gpu-quick.xml",
                 lambda tmp: ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True))


def pytest_cmd(run: Run, tests: tuple[str, str], junit: Path) -> list[str]:
    path, select = tests
    return [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=8", path,
            "-m", "gpu", "-k", select, f"--junitxml={junit}"]


def summary_line(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.exists() else []
    return lines[-1][:300] if lines else "(no output)"


def correctness_section(run: Run, seconds: float, junits: dict) -> str:
    """The attention and Reassemble GPU tests in two processes at once (Triton compiles on the CPU)."""
    env = _env(run, DPT_FAST_AUTOTUNE="quick")
    procs = {}
    for name, tests in (("attention", ATTENTION_TESTS), ("reassemble", REASSEMBLE_TESTS)):
        junits[name] = run.work / f"junit-{name}.xml"
        procs[name] = start(run, f"tests-{name}", pytest_cmd(run, tests, junits[name]), env)
    notes, failed = [], []
    deadline = time.monotonic() + seconds
    for name, (proc, log_path) in procs.items():
        rc = wait(proc, deadline - time.monotonic())
        tail(run, log_path)
        merge_junit(run, junits)
        notes.append(f"{name}: {'cut at the cap' if rc is None else f'exit {rc}'}: {summary_line(log_path)}")
        if rc not in (0, 5):  # 5: nothing collected (--smoke: every GPU test skipped is 0)
            failed.append(name)
    if failed:
        raise RuntimeError("; ".join(notes))
    return "; ".join(notes)


def rcu_tests_section(run: Run, seconds: float, build, junits: dict) -> str:
    """Wait for the background build (started first thing), then the residual conv unit's GPU tests."""
    deadline = time.monotonic() + seconds
    proc, log_path = build
    rc = wait(proc, seconds * 0.6)
    tail(run, log_path, 60)
    if rc is None:
        raise RuntimeError("the CUDA extension build did not finish in time")
    if rc != 0 or not extension_registered(run):
        raise RuntimeError(f"the CUDA extension did not build or load (build exit {rc}): see the log")
    junits["rcu"] = run.work / "junit-rcu.xml"
    test_proc, test_log = start(run, "tests-rcu", pytest_cmd(run, RCU_TESTS, junits["rcu"]), _env(run))
    rc = wait(test_proc, deadline - time.monotonic())
    tail(run, test_log)
    merge_junit(run, junits)
    note = f"rcu: {'cut at the cap' if rc is None else f'exit {rc}'}: {summary_line(test_log)}"
    if rc not in (0, 5):
        raise RuntimeError(note)
    return note


WARM_SCRIPT = r"""
# Runs the benchmarked fused kernels once at the benchmarked shapes (full autotune): their Triton compiles
# land in the on-disk cache. Timings here mean nothing (the tests share the GPU).
import sys, torch, dpt_fast
from dpt_fast import ops
dev, dt = "cuda", torch.bfloat16
with dpt_fast.use_backend("fused"):
    for n, b in ((1370, 48), (9217, 7), (1370, 16)):
        qkv = torch.randn(b, n, 3 * 1024, device=dev, dtype=dt, requires_grad=True)
        ops.attention(qkv, 16).sum().backward()
        print("warm attention", n, flush=True)
        del qkv
    for size in (512, 1024):  # DPT-Large stage 1 forward + backward, as bench_reassemble times it
        g = size // 16
        p = lambda *shape: torch.randn(*shape, device=dev, dtype=dt, requires_grad=True) * 0.02  # noqa: E731
        tokens = torch.randn(1, 1 + g * g, 1024, device=dev, dtype=dt, requires_grad=True)
        out = ops.reassemble(tokens, p(1024, 2048), p(1024), p(256, 1024, 1, 1), p(256), p(256, 256, 4, 4), p(256),
                             g, g, 1, "project", "up4")
        out.float().sum().backward()
        print("warm reassemble stage 1", size, flush=True)
    from dpt_fast.bench import build_dpt
    model = build_dpt("large", dev, dt, train=False).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(torch.randn(16, 3, 384, 384, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last))
    print("warm dpt-large 384 b16", flush=True)
"""


def start_warmer(run: Run):
    if run.smoke:
        return None
    return start(run, "warm", [sys.executable, "-c", WARM_SCRIPT], _env(run, DPT_FAST_AUTOTUNE="full"))


def bench_section(run: Run, seconds: float, name: str, args: list[str]) -> str:
    out = run.out / f"{name}.json"
    inner = seconds * 0.7 if run.smoke else seconds - 25  # no new row after this; the rest: startup, the end
    cmd = [sys.executable, f"benchmarks/bench_{name}.py", "--out", str(out), *args,
           "--budget-s", str(max(5, int(inner)))]
    if run.smoke:
        cmd.append("--smoke")
    proc, log_path = start(run, f"bench-{name}", cmd, _env(run, DPT_FAST_AUTOTUNE="full"))
    rc = wait(proc, seconds)
    tail(run, log_path, 30)
    note = f"{'cut at the cap' if rc is None else f'exit {rc}'}: {summary_line(log_path)}"
    if not out.exists():
        raise RuntimeError(note)
    if rc == 1 and run.smoke and json.loads(out.read_text()).get("complete"):
        # exit 1 with a finished report: the reference served some calls -- on a CPU the RCU always does
        return note + " (a CPU dry run: the reference serves where no CUDA kernel exists)"
    if rc not in (0, None):
        raise RuntimeError(note)
    return note


def e2e_section(run: Run, seconds: float) -> str:
    folder = run.work / "e2e"
    args = (["--tiny", "--device", "cpu", "--warmup", "1", "--runs", "3", "--variants", "fused,reference"] if run.smoke
            else ["--models", "large", "--sizes", "384", "--batch", "16", "--warmup", "2", "--runs", "20",
                  "--max-time", "3", "--variants", "fused,reference,hf-sdpa"])
    cmd = [sys.executable, "-m", "dpt_fast.cli", "bench", *args,
           "--budget-s", str(max(5, int(seconds - 20))), "--out", str(folder)]
    proc, log_path = start(run, "e2e", cmd, _env(run, DPT_FAST_AUTOTUNE="full"))
    rc = wait(proc, seconds)
    tail(run, log_path, 30)
    found = sorted(folder.glob("*.json"))
    if found:
        atomic_write(run.out / "e2e.json", lambda tmp: shutil.copyfile(found[-1], tmp))
    note = f"{'cut at the cap' if rc is None else f'exit {rc}'}: {summary_line(log_path)}"
    if rc not in (0, None) or not found:
        raise RuntimeError(note)
    return note


# --- the run -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the result files (created)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget of the whole run (default 450 s; --smoke: 600 s)")
    p.add_argument("--smoke", action="store_true", help="CPU dry run: interpreter, tiny shapes, no build")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 450.0)
    if budget <= 0:
        print("gpu_quick: --budget-s must be positive", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, budget, args.smoke)
    run.log(f"gpu_quick {'--smoke ' if args.smoke else ''}budget {budget:.0f} s, out {out}, "
            f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")
    junits: dict[str, Path] = {}
    build = warmer = None
    try:
        setup = run.section("install", 90, lambda s: ensure_installed(run, s), min_s=5)
        if setup["status"] != "ok":
            return 1
        if not args.smoke:
            build = start_extension_build(run)  # now: it is the longest, and needs only the CPU
        warmer = start_warmer(run)
        run.section("environment", 90, lambda s: environment_section(run, s), min_s=5)
        run.section("correctness", 200 if not args.smoke else 60,
                    lambda s: correctness_section(run, s, junits))
        if build is not None:
            run.section("rcu-correctness", 120, lambda s: rcu_tests_section(run, s, build, junits))
        if warmer is not None:
            stop(warmer[0], signal.SIGKILL)
            tail(run, warmer[1], 10)
        smoke = args.smoke
        run.section("bench-attention", 80, lambda s: bench_section(
            run, s, "attention", ["--sizes", *(["64", "100"] if smoke else ["1370", "9217"]), "--extra",
                                  *([] if smoke else ["1370x16"]), "--no-block"]))
        run.section("bench-reassemble", 60, lambda s: bench_section(
            run, s, "reassemble", ["--models", "large", "--sizes", "64" if smoke else "512,1024", "--stages", "1",
                                   "--no-compile"]))
        run.section("bench-rcu", 50, lambda s: bench_section(
            run, s, "rcu", ["--maps", "16" if smoke else "148,256", "--batches", "1,8" if not smoke else "1",
                            "--no-compile"]))
        run.section("end-to-end", 100, lambda s: e2e_section(run, s))
    finally:
        for job in (warmer, build):
            if job is not None and job[0].poll() is None:
                stop(job[0], signal.SIGKILL)
        run.save()
        run.log(f"done in {run.elapsed():.0f} s; files: {', '.join(sorted(p.name for p in out.iterdir()))}")
        shutil.rmtree(run.work, ignore_errors=True)
    return 0 if all(s["status"] == "ok" for s in run.sections) else 1


if __name__ == "__main__":
    sys.exit(main())
