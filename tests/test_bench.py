"""`dpt-fast bench` in its tiny CPU setting, and the pieces it is built from."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dpt_fast import DPTDepthModel, backend, bench, cli, use_backend

TINY = dict(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11], features=32)


FELL_BACK = "fused (fell back to reference: attention, reassemble, rcu)"


def test_bench_tiny_cpu_writes_json_table_and_plot(tmp_path):
    # As CI runs it (README's install line): a fresh process, Triton kernels not interpreted, so the fused
    # variant falls back to the reference on CPU -- and must say so, and time like the reference.
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "dpt_fast.cli", "bench", "--tiny", "--device", "cpu", "--sizes", "64",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    assert f"| tiny | 64x64 | 2 | {FELL_BACK} |" in proc.stdout  # the fallback is marked
    files = {p.suffix: p for p in out.iterdir()}
    assert set(files) == {".json", ".md", ".png"}
    assert files[".png"].stat().st_size > 1000
    report = json.loads(files[".json"].read_text())
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["dtype"] == "float32" and env["date"]
    for name in ("torch", "triton", "timm", "transformers", "dpt_fast"):
        assert name in env["versions"]
    assert report["settings"]["tiny"] and report["settings"]["skipped_variants"] == ["reference+compile",
                                                                                    "fused+compile"]
    assert report["settings"]["models"] == ["tiny", "da2-tiny"]  # --tiny covers DPT and Depth Anything
    expected = {"fused", "reference"} | ({"hf-sdpa"} if env["versions"]["transformers"] else set())
    # Depth Anything's inputs are multiples of 14: the requested 64 runs as 70
    for model, side in (("tiny", 64), ("da2-tiny", 70)):
        rows = {r["variant"]: r for r in report["results"] if r["model"] == model}
        assert set(rows) == expected, model
        for r in rows.values():
            assert r["error"] is None, r
            assert r["size"] == [side, side] and r["requested_size"] == [64, 64] and r["batch"] == 2
            assert r["latency_ms"] > 0 and r["images_per_s"] > 0 and r["runs"] >= 2 and r["cpu_ms"] > 0
            assert r["flops"] > 0 and r["tflops"] > 0
            assert r["output_shape"] == [2, side, side] and r["output_finite"]
            assert r["implementations"]
    da = {r["variant"]: r for r in report["results"] if r["model"] == "da2-tiny"}
    assert da["reference"]["backbone"] == "da2-small" and da["fused"]["fused_path"]["verified"] is False
    assert da["reference"]["implementations"]["dpt_fast::attention"] == {"reference": 4}  # its four blocks
    if "hf-sdpa" in da:
        assert da["hf-sdpa"]["implementations"] == {
            "transformers": {"DepthAnythingForDepthEstimation(backbone attn_implementation=sdpa)": 1}}
        assert "| da2-tiny | 70x70 | 2 | hf-sdpa |" in proc.stdout
    variants = {r["variant"]: r for r in report["results"] if r["model"] == "tiny"}
    assert set(variants["fused"]["speedup"]) >= {"reference"}
    ran = variants["reference"]["implementations"]
    assert set(ran) == {"dpt_fast::attention", "dpt_fast::reassemble", "dpt_fast::residual_conv_unit"}
    assert all(set(impls) == {"reference"} for impls in ran.values())
    assert set(variants["fused"]["implementations"]["dpt_fast::attention"]) == {"reference"}  # recorded, not hidden
    assert variants["fused"]["fused_path"]["verified"] is False and "reference" not in variants["reference"].get(
        "fused_path", {})
    assert report["complete"] and report["ceilings"]["matmul_tflops"] > 0 and report["ceilings"]["copy_tbps"] > 0
    table = files[".md"].read_text()
    assert f"| tiny | 64x64 | 2 | {FELL_BACK} |" in table and env["versions"]["torch"] in table
    assert "the reference served 12 of 12 calls" in table
    # a CPU run says how it timed (no CUDA events here) and what its numbers mean
    for method in (report["timing"]["method"], report["ceilings"]["method"]):
        assert "perf_counter" in method and "CUDA" not in method
    assert report["timing"]["threads"] == 1 and "1 intra-op thread" in table
    assert any("fused kernels need a CUDA GPU" in note for note in report["notes"]) and "CPU run:" in table
    assert "| 0.0 |" not in table  # MP/s with its significant digits (was rounded to 0.0)
    # fused fell back to the reference operators: fused and reference computed the same thing with the same
    # weights, and must time the same within the noise of a shared machine (stated: 1.5x; once 14x apart)
    for key in ("latency_ms", "cpu_ms"):
        ratio = variants["fused"][key] / variants["reference"][key]
        assert 1 / 1.5 < ratio < 1.5, (key, variants["fused"][key], variants["reference"][key])


def test_time_interleaved_alternates_the_order():
    calls = []
    walls = bench.time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"),
                                   warmup=1, runs=3, max_time=10.0)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert [len(w) for w, _ in walls] == [3, 3] and all(c >= 0 for _, cpus in walls for c in cpus)


def test_run_variant_restores_the_backend_and_records_errors(tmp_path):
    import argparse
    args = argparse.Namespace(train=False, compile_mode="max-autotune", warmup=0, runs=1, max_time=0.0)
    x = torch.randn(1, 3, 32, 64)
    r = bench.run_variant("hf-sdpa", "tiny", x, args, torch.device("cpu"), torch.float32, None, None)
    assert r["error"] and "square" in r["error"]  # HF's DPT cannot take a non-square input: reported
    with use_backend("reference"):
        r = bench.run_variant("reference", "tiny", x, args, torch.device("cpu"), torch.float32, 1e9, None)
        assert r["error"] is None and r["latency_ms"] > 0 and r["tflops"] > 0
        assert backend.get_backend() == "reference"
    assert backend.get_backend() == "fused"


def test_inline_plain_ops_is_the_reference():
    torch.manual_seed(0)
    model = DPTDepthModel(**TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), use_backend("reference"):
        expected = model(x)
        backend.implementations_ran(reset=True)
        for attention in ("sdpa", "matmul"):
            with bench.inline_plain_ops(attention):
                torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        assert backend.implementations_ran() == {}  # no custom op was called: compile sees plain aten ops
        assert model(x).shape == (2, 64, 96)
        assert backend.implementations_ran()["dpt_fast::attention"] == {"reference": 12}  # the operators are back


def test_flop_count_scales_with_batch_and_size():
    one = bench.count_flops("tiny", 1, (64, 64), train=False)
    assert one > 0
    assert bench.count_flops("tiny", 2, (64, 64), train=False) == 2 * one
    assert bench.count_flops("tiny", 1, (128, 128), train=False) > 3.5 * one
    assert bench.count_flops("tiny", 1, (64, 64), train=True) > 2 * one  # forward + backward


def test_bench_models_read_their_facts_from_specs():
    from dpt_fast import specs
    assert bench.model_spec("large") is specs.get("dpt-large") and bench.model_spec("hybrid") is specs.get("dpt-hybrid")
    assert bench.hf_config("large").neck_hidden_sizes == list(specs.get("dpt-large").reassemble_widths)
    for name in ("da2-small", "da2-large"):
        spec, config = specs.get(name), bench.hf_config(name)
        assert bench.model_spec(name) == spec and bench.input_multiple(name) == 14
        assert config.backbone_config.out_indices == [t + 1 for t in spec.taps]
        assert config.neck_hidden_sizes == list(spec.reassemble_widths) and config.fusion_hidden_size == spec.features
        assert config.reassemble_hidden_size == config.backbone_config.hidden_size == spec.embed_dim
        assert config.backbone_config.patch_size == config.patch_size == 14
        assert config.backbone_config.num_attention_heads == spec.num_heads
    tiny = bench.model_spec("da2-tiny")
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.taps) == (64, 4, 1, (0, 1, 2, 3))


def test_depth_anything_baseline_matches_the_architecture():
    pytest.importorskip("transformers")
    hf = bench.build_hf("da2-tiny", "cpu", torch.float32, train=False)
    ours = bench.build_model("da2-tiny", "cpu", torch.float32, train=False)
    # the same architecture: as many weights (transformers splits qkv in three, and keeps the 64-wide mask
    # token as a parameter where dpt-fast has a buffer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) + 64 == count(hf)
    assert bench.hf_attention(hf) == "DepthAnythingForDepthEstimation(backbone attn_implementation=sdpa)"
    # and the same weights: dpt-fast's variants run transformers' seeded init, converted
    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad(), use_backend("reference"):
        ours_out, hf_out = ours.eval()(x), hf.eval()(pixel_values=x).predicted_depth
    assert ((ours_out - hf_out).norm() / hf_out.norm()).item() < 1e-4
    import argparse
    args = argparse.Namespace(train=False, compile_mode="max-autotune", warmup=0, runs=1, max_time=0.0)
    r = bench.run_variant("hf-sdpa", "da2-tiny", torch.randn(1, 3, 28, 56), args, torch.device("cpu"), torch.float32,
                          None, None)
    assert r["error"] is None and r["output_shape"] == [1, 28, 56]  # non-square runs (unlike HF's DPT)


def test_depth_anything_flops_count_the_dinov2_and_its_decoder():
    one = bench.count_flops("da2-tiny", 1, (70, 70), train=False)
    assert one > 0 and bench.count_flops("da2-tiny", 2, (70, 70), train=False) == 2 * one
    # DA-V2 Small at 518 x 518: 1370 tokens through 12 blocks of width 384 -- about 2 * 21.6M * 1369 MACs
    # in the encoder alone, plus the decoder
    small = bench.count_flops("da2-small", 1, (518, 518), train=False)
    assert 60e9 < small < 200e9
    assert bench.count_flops("da2-large", 1, (518, 518), train=False) > 8 * small


def test_parse_sizes_and_batches():
    assert bench.parse_configs("384,1536,4k", None) == [("384", (384, 384), 16), ("1536", (1536, 1536), 1),
                                                        ("4k", (2160, 3840), 1)]
    assert [c[2] for c in bench.parse_configs("384,1024", "4")] == [4, 4]
    assert [c[2] for c in bench.parse_configs("384,1024", "8,2")] == [8, 2]
    assert bench.parse_configs("512x768:3", None) == [("512x768", (512, 768), 3)]
    with pytest.raises(ValueError):
        bench.parse_configs("384,1024", "1,2,3")
    with pytest.raises(ValueError):
        bench.parse_size("huge")


def test_bench_skip_pairs(tmp_path):
    # a malformed or unknown pair is refused before anything runs
    for bad in ("hybrid", "tiny@4k", "gigantic@64"):
        assert cli.main(["bench", "--tiny", "--device", "cpu", "--sizes", "64", "--skip", bad,
                         "--out", str(tmp_path)]) == 2
    # a skipped pair is neither run nor listed as a result
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--tiny", "--device", "cpu", "--sizes", "64,96", "--skip", "tiny@96",
                     "--variants", "reference", "--runs", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {(r["model"], r["size_label"]) for r in report["results"]} == {("tiny", "64"), ("da2-tiny", "64"),
                                                                          ("da2-tiny", "96")}
    assert report["settings"]["skipped_pairs"] == ["tiny@96"]
    assert torch.get_num_threads() == threads  # a CPU run's one thread (--threads) is restored afterwards


def test_bench_rejects_unknown_model(capsys):
    assert cli.main(["bench", "--models", "gigantic", "--device", "cpu"]) == 2
    assert "unknown model" in capsys.readouterr().err


# --- benchmark harness: ceilings, deadlines, fused-path verdicts ----------------------------------

def test_measure_ceilings_on_cpu_are_positive():
    c = bench.measure_ceilings(torch.device("cpu"), torch.float32)
    assert c["matmul_tflops"] > 0 and c["copy_tbps"] > 0 and "copy_" in c["method"]
    harness = _script("harness")
    assert harness.fraction(1.0, 4.0) == 0.25 and harness.fraction(None, 4.0) is None and harness.fraction(1.0, 0) is None


def test_deadline_interrupts_a_long_step_and_restores_the_handler():
    import signal
    import time
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(bench.DeadlineExceeded):
        with bench.deadline(0.3, "busy loop"):
            while time.perf_counter() - t0 < 10:
                torch.ones(64).sum()
    assert time.perf_counter() - t0 < 3
    assert signal.getsignal(signal.SIGALRM) == before
    assert not issubclass(bench.DeadlineExceeded, Exception)  # torch.compile's `except Exception` cannot eat it
    with bench.deadline(None):  # no limit: a no-op
        pass
    with pytest.raises(bench.DeadlineExceeded):
        with bench.deadline(0, "nothing left"):
            pass


def test_verify_fused_flags_any_reference_call_and_missing_ops():
    ran = {"dpt_fast::attention": {"triton": 12}, "dpt_fast::reassemble": {"triton": 4}}
    assert bench.verify_fused(ran, ["dpt_fast::attention"]) == {"verified": True, "problems": []}
    v = bench.verify_fused({**ran, "dpt_fast::residual_conv_unit": {"cuda": 5, "reference": 2}},
                           bench.FUSED_OPS)
    assert not v["verified"] and "reference served 2 of 7" in v["problems"][0]
    v = bench.verify_fused(ran, bench.FUSED_OPS)
    assert not v["verified"] and v["problems"] == ["dpt_fast::residual_conv_unit was never called"]


def test_bench_budget_and_compile_cap_are_recorded(tmp_path):
    # a compile over its cap (--compile-timeout-s) is recorded as skipped (no fallback), and a spent budget
    # skips the rest. The cap is 10 ms: with Inductor's caches warm from earlier tests a tiny model's compile
    # can finish within a second, and the cap must be certain to bite.
    args = ["bench", "--tiny", "--models", "tiny", "--device", "cpu", "--sizes", "64", "--runs", "1", "--warmup", "0",
            "--variants", "reference,reference+compile", "--compile-timeout-s", "0.01", "--out", str(tmp_path / "a")]
    assert cli.main(args) == 0
    report = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert report["complete"] and report["ceilings"]["matmul_tflops"] > 0
    assert rows["reference"]["error"] is None and rows["reference"]["latency_ms"] > 0
    compiled = rows["reference+compile"]
    assert compiled["error"].startswith("skipped: compile over budget") and compiled["timed_out"] == "compile"
    assert compiled["compile_mode"] == "max-autotune"
    assert cli.main(args[:-1] + [str(tmp_path / "b"), "--budget-s", "0"]) == 0
    report = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert all(r["error"].startswith("skipped: time budget") for r in report["results"])
    assert "skipped: time budget" in next((tmp_path / "b").glob("*.md")).read_text()


# --- the benchmark scripts, dry-run on the CPU (--smoke), and render_results.py --------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory):
    """Every benchmark script's --smoke run (CPU, tiny shapes): their JSON and exit status."""
    if not backend.triton_interpreting():
        pytest.skip("the --smoke runs use the Triton interpreter (CPU-only machines)")
    out = tmp_path_factory.mktemp("smoke")
    runs = {
        "attention": ["--smoke"],
        "reassemble": ["--smoke", "--no-compile"],
        "rcu": ["--smoke", "--maps", "8", "--batches", "1", "--compile-timeout-s", "0.5"],
        "train": ["--smoke", "--variants", "fused,reference"],
    }
    status = {}
    for name, argv in runs.items():
        status[name] = _script(f"bench_{name}").main(argv + ["--out", str(out / f"{name}.json")])
    return out, status


def test_smoke_runs_record_what_ran(smoke_outputs):
    out, status = smoke_outputs
    assert status == {"attention": 0, "reassemble": 0, "rcu": 1, "train": 0}  # rcu: the reference served
    docs = {name: json.loads((out / f"{name}.json").read_text()) for name in status}
    for name, doc in docs.items():
        assert doc["complete"] and doc["smoke"], name
        env = doc.get("environment", doc)
        assert env["device_type"] == "cpu" and env["versions"]["torch"] and env["date"]
        assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_tbps"] > 0
    att = docs["attention"]
    assert att["fused_path_verified"] and {r["tokens"] for r in att["kernel"]} == {17, 40}
    assert att["block"] and all(r["fused_path"]["verified"] for r in att["kernel"] + att["block"])
    row = att["kernel"][0]
    assert set(row["ms"]["dpt_fast"]) == {"fwd", "bwd", "fwd_bwd"} and row["flops"]["fwd_bwd"] == 3.5 * row["flops"]["fwd"]
    assert row["max_abs_diff_vs_dpt_fast"]["math"] < 1e-4  # the interpreter's kernel agrees with SDPA
    re_rows = docs["reassemble"]["results"]
    assert {r["mode"] for r in re_rows} == {"fwd", "fwd+bwd"} and all(r["fused_path"]["verified"] for r in re_rows)
    assert all(r["fused_max_rel_err_vs_eager"] < 1e-4 and r["fused_out_channels_last"] for r in re_rows)
    rcu = docs["rcu"]
    assert not rcu["fused_path_verified"] and all(not r["fused_path"]["verified"] for r in rcu["results"])
    assert any(r["compiled_note"].startswith("skipped: compile over budget") or r["compiled_ms"] for r in rcu["results"])
    train = {r["variant"]: r for r in docs["train"]["results"]}
    assert train["reference"]["step_ms"] > 0 and train["reference"]["loss_finite"]
    assert train["fused"]["fused_path"]["verified"] is False  # bf16 autocast on CPU: the reference served


def test_smoke_runs_of_the_depth_anything_presets(tmp_path):
    # --preset da: several head counts / widths and batches in one run, each row saying which
    if not backend.triton_interpreting():
        pytest.skip("the --smoke runs use the Triton interpreter (CPU-only machines)")
    att, rea, rcu = (_script(f"bench_{n}") for n in ("attention", "reassemble", "rcu"))
    assert att.DA_TOKENS_518 == 1370 and att.DA_TOKENS_FRAME == 10002
    assert {(n, b) for n, b, _ in att.DA_CASES} == {(1370, 1), (1370, 16), (10002, 1)}
    assert {h for _, _, h in att.DA_CASES} == {6, 12, 16}
    assert rea.MODELS["da2-large"] == (1024, [(1, "ignore", "up4", 256), (2, "ignore", "up2", 512),
                                              (3, "ignore", "none", 1024), (4, "ignore", "down2", 1024)])
    assert rea.PATCH["da2-small"] == 14 and rcu.PRESETS["da"]["channels"] == "64,128,256"
    assert att.main(["--smoke", "--preset", "da", "--no-block", "--out", str(tmp_path / "a.json")]) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert {(r["tokens"], r["batch"], r["heads"]) for r in doc["kernel"]} == {(17, 1, 1), (17, 3, 2)}
    assert all(r["fused_path"]["verified"] for r in doc["kernel"]) and "| 17 | 3 | 2 | fwd |" in att.markdown(doc)
    assert rea.main(["--smoke", "--preset", "da", "--no-compile", "--stages", "all",
                     "--out", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {r["model"] for r in rows} == {"da2-small"} and all(r["fused_path"]["verified"] for r in rows)
    assert all(s["readout"] == "ignore" for r in rows for s in r["stages"])
    assert all(r["fused_max_rel_err_vs_eager"] < 1e-4 for r in rows)
    assert rcu.main(["--smoke", "--preset", "da", "--no-compile", "--modes", "fwd",
                     "--out", str(tmp_path / "c.json")]) == 1  # the reference serves on a CPU
    rows = json.loads((tmp_path / "c.json").read_text())["results"]
    assert {(r["channels"], r["batch"]) for r in rows} == {(8, 1), (8, 2), (16, 1), (16, 2)}
    assert all(r["fused_rel_l2_err_vs_eager"] < 1e-4 for r in rows)


def test_render_results_refuses_non_gpu_and_renders_a_dry_run_elsewhere(smoke_outputs, tmp_path):
    render = _script("render_results")
    out, _ = smoke_outputs
    results_md = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = open(results_md).read()
    assert render.main([str(out)]) == 2  # CPU dry runs never reach the repository's results
    assert render.main([str(out), "--allow-non-gpu"]) == 2  # ... not even with the flag, without explicit paths
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# head\n\n{render.BEGIN}\nold\n{render.END}\n\ntail\n")
    assert render.main([str(out), "--allow-non-gpu", "--results-dir", str(tmp_path / "r"), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("tail") and "old" not in text
    assert "NOT A GPU MEASUREMENT" in text and "#### Attention:" in text and "#### Training step" in text
    (merged,) = (tmp_path / "r").glob("*.json")
    run = json.loads(merged.read_text())
    assert run["fixture"] and set(run["benchmarks"]) == {"attention", "reassemble", "rcu", "train"}
    statuses = {t["target"]: t["status"] for t in run["targets"]}
    assert statuses["forward+backward >= 1.2x eager"] == "not verified"  # rcu: the reference ran
    assert all(t["status"] == "not measured" for t in run["targets"] if t["area"] == "end to end")
    assert open(results_md).read() == before


# A FIXTURE shaped like a GPU run's output (made-up numbers, device named FIXTURE): it tests the target
# arithmetic of render_results.py and is written only to a temporary folder, never to RESULTS.md.
def _fixture_env(date="2031-01-02T03:04:05+00:00"):
    return {"device": "NVIDIA H100 80GB HBM3 FIXTURE", "device_type": "cuda", "dtype": "bfloat16", "date": date,
            "versions": {"torch": "9.9", "triton": "9.9", "cuda": "13.0", "cudnn": 1, "timm": "1", "transformers": "5",
                         "python": "3.12", "dpt_fast": "0.1.0"}, "git_commit": "fixture", "triton_interpret": False}


def _fixture_e2e(rows, date="2031-01-02T03:04:05+00:00"):
    ok = {"verified": True, "problems": []}
    results = []
    for model, label, batch, variant, ms, extra in rows:
        r = {"model": model, "size_label": label, "size": [2176, 3840] if label == "4k" else [int(label)] * 2,
             "batch": batch, "variant": variant, "error": None if ms else "skipped: compile over budget",
             "latency_ms": ms, "images_per_s": batch / ms * 1e3 if ms else None, **extra}
        if variant.startswith("fused"):
            r.setdefault("fused_path", ok)
        results.append(r)
    return {"benchmark": "e2e_inference", "environment": _fixture_env(date), "results": results, "complete": True,
            "settings": {"models": ["large", "hybrid"], "sizes": ["384", "1536", "4k"], "variants": [], "tiny": False},
            "ceilings": {"matmul_tflops": 790.0, "copy_tbps": 3.0}}


def _targets_by_start(run):
    return lambda start: next(x for x in run["targets"] if x["target"].startswith(start))


def test_render_results_target_arithmetic_on_a_fixture(tmp_path):
    render = _script("render_results")
    rows = []
    for model in ("large", "hybrid"):
        for label, batch in (("384", 16), ("1536", 1)):
            rows += [(model, label, batch, "fused", 10.0, {}), (model, label, batch, "hf-sdpa", 17.0, {}),
                     (model, label, batch, "reference+compile", 12.0, {"compile_mode": "max-autotune"})]
    rows.append(("large", "4k", 1, "fused", 500.0, {"mfu": 0.55}))
    first = tmp_path / "e2e.json"
    first.write_text(json.dumps(_fixture_e2e(rows)))
    md = tmp_path / "R.md"
    assert render.main([str(first), "--results-dir", str(tmp_path / "r"), "--markdown", str(md)]) == 0
    run = json.loads((tmp_path / "r" / "nvidia-h100-80gb-hbm3-fixture-2031-01-02.json").read_text())
    t = _targets_by_start(run)
    hf = t("end to end >= 1.6x HF")
    assert hf["status"] == "met" and hf["worst"] == 1.7 and hf["device_matches_target"]
    assert t("end to end >= 1.25x torch.compile")["status"] == "not met"  # 1.2x < 1.25x
    assert t("DPT-Large at 4K")["status"] == "met"
    assert {x["status"] for x in run["targets"] if x["area"] != "end to end"} == {"not measured"}
    # a later stage (next day, UTC) adds a slower fused row for one configuration and a compile that fell back
    # to mode=default; the measured rows stay, the merged run is the same file
    later = _fixture_e2e([("hybrid", "1536", 1, "fused+compile", 9.0, {"fused_path": {"verified": False, "problems": ["x"]}}),
                          ("large", "384", 16, "reference+compile", 13.0, {"compile_mode": "default"}),
                          ("large", "384", 16, "hf-sdpa", None, {})], date="2031-01-03T00:10:00+00:00")
    second = tmp_path / "later.json"
    second.write_text(json.dumps(later))
    assert render.main([str(second), "--results-dir", str(tmp_path / "r"), "--markdown", str(md)]) == 0
    assert [p.name for p in (tmp_path / "r").glob("*.json")] == ["nvidia-h100-80gb-hbm3-fixture-2031-01-02.json"]
    run = json.loads((tmp_path / "r" / "nvidia-h100-80gb-hbm3-fixture-2031-01-02.json").read_text())
    t = _targets_by_start(run)
    assert t("end to end >= 1.6x HF")["status"] == "not verified"  # the best fused row ran the reference
    compile_target = t("end to end >= 1.25x torch.compile")
    assert "mode=default" in compile_target["note"] and compile_target["rows"] == 3
    text = md.read_text()
    assert "FIXTURE" in text and "NOT A GPU MEASUREMENT" not in text and render.BEGIN in text
    # the tests stage's files: environment.json (tests stopped at the budget) and the junit XML
    env = tmp_path / "tests-stage"
    env.mkdir()
    (env / "environment.json").write_text(json.dumps({"benchmark": "environment", **_fixture_env(),
                                                      "ceilings": {"matmul_tflops": 790.0, "copy_tbps": 3.0},
                                                      "gpu_tests_exit_status": 124}))
    (env / "junit-gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.test_x" name="test_ok"/><testcase classname="tests.test_x" name="test_bad">'
        '<failure message="boom"/></testcase><testcase classname="tests.test_x" name="test_skip"><skipped/>'
        '</testcase></testsuite></testsuites>')
    assert render.main([str(env), "--results-dir", str(tmp_path / "r"), "--markdown", str(md)]) == 0
    run = json.loads((tmp_path / "r" / "nvidia-h100-80gb-hbm3-fixture-2031-01-02.json").read_text())
    assert run["gpu_tests"]["passed"] == 1 and run["gpu_tests"]["failed_tests"] == ["tests.test_x::test_bad"]
    assert set(run["benchmarks"]) == {"environment", "e2e_inference"}
    text = md.read_text()
    assert "1 passed, 1 failed, 1 skipped" in text and "STOPPED at the stage's time budget" in text


def test_render_results_never_calls_a_target_met_on_partial_rows(tmp_path):
    """Rows that meet a target are not enough when others it covers were skipped, failed or never reached:
    "incomplete". A measured row below the threshold still makes it "not met"."""
    render = _script("render_results")
    ok = {"verified": True, "problems": []}

    def kernel_row(tokens, batch, ratio):
        return {"tokens": tokens, "batch": batch, "vs_best_sdpa": {"fwd": ratio, "bwd": ratio, "fwd_bwd": ratio},
                "best_sdpa": {"fwd": "flash", "bwd": "flash", "fwd_bwd": "flash"}, "fused_path": ok,
                "tflops": {"dpt_fast": {"fwd": 400.0}}, "fraction_of_matmul_peak": {"fwd": 0.5}}
    attention = {"benchmark": "attention", **_fixture_env(), "dtype": "bf16", "heads": 16, "head_dim": 64,
                 "kernel": [kernel_row(577, 16, 0.95), kernel_row(2305, 28, 1.3)], "block": [], "complete": True,
                 "notes": ["failed: kernel N=9217 B=7: RuntimeError: boom", "timm not installed: no block table"]}

    def rcu_row(size, mode, ratio, compiled):
        return {"size": size, "batch": 8, "mode": mode, "eager_ms": 1.0, "fused_ms": 1.0 / ratio,
                "speedup_vs_eager": ratio, "fused_path": ok, "compiled_ms": compiled,
                "speedup_vs_compiled": None if compiled is None else compiled * ratio}
    rcu = {"benchmark": "rcu", **_fixture_env(), "complete": False, "notes": [],  # killed at its time limit
           "results": [rcu_row(96, "fwd", 2.0, 1.5), rcu_row(192, "fwd", 2.0, None), rcu_row(96, "fwd+bwd", 1.1, None)]}
    train = {"benchmark": "train_step", "environment": _fixture_env(), "complete": True, "size": 384,
             "results": [{"model": "DPT-Hybrid", "variant": v, "batch": 16, "step_ms": ms, "images_per_s": 16e3 / ms,
                          "peak_memory_gib": gib, **({"fused_path": ok} if v == "fused" else {})}
                         for v, ms, gib in (("fused", 100.0, 10.0), ("reference", 150.0, 20.0))]}
    rows = [(m, s, b, v, ms, {}) for m, s, b in (("large", "384", 16), ("large", "1536", 1), ("hybrid", "384", 16))
            for v, ms in (("fused", 10.0), ("hf-sdpa", 20.0))]
    folder = tmp_path / "in"
    folder.mkdir()
    for name, doc in (("attention", attention), ("rcu", rcu), ("train", train), ("e2e", _fixture_e2e(rows))):
        (folder / f"{name}.json").write_text(json.dumps(doc))
    assert render.main([str(folder), "--results-dir", str(tmp_path / "r"), "--markdown", str(tmp_path / "R.md")]) == 0
    (merged,) = (tmp_path / "r").glob("*.json")
    t = _targets_by_start(json.loads(merged.read_text()))
    big = t("forward >= 1.0x the best SDPA backend, N >= 2305")
    assert big["status"] == "incomplete" and "N=9217" in big["detail"]  # the failed row is named
    assert t("forward >= 0.9x the best SDPA backend, N = 577")["status"] == "met"  # its rows all measured
    assert t("forward+backward >= 1.0x")["status"] == "not met"  # 0.95 measured: a gap cannot rescue it
    assert t("attention block >= 1.1x timm's Attention, forward")["status"] == "not measured"
    assert t("forward >= 1.5x eager (cuDNN)")["status"] == "incomplete"  # the run was cut short
    assert t("forward >= 1.2x torch.compile")["status"] == "incomplete"  # 192^2 has no compiled baseline
    assert t("forward+backward >= 1.2x eager")["status"] == "not met"
    assert t("DPT-Hybrid: training step")["status"] == "met" and t("DPT-Hybrid: peak memory")["status"] == "met"
    assert t("DPT-Large: training step")["status"] == "not measured"  # never reached: still listed
    hf = t("end to end >= 1.6x HF")
    assert hf["status"] == "incomplete" and hf["missing_rows"] == ["DPT-Hybrid 1536^2 b1"]
    assert "| incomplete |" in (tmp_path / "R.md").read_text()


def test_gpu_suite_is_valid_bash_and_its_benchmark_arguments_parse(tmp_path):
    suite = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
    assert subprocess.run(["bash", "-n", suite]).returncode == 0
    text = open(suite).read()
    # the arguments the suite passes (each must appear in it), accepted by each script's parser
    calls = {
        "bench_attention": ["--out", "x.json"],
        "bench_reassemble": ["--out", "x.json", "--compile-timeout-s", "90"],
        "bench_rcu": ["--out", "x.json", "--compile-timeout-s", "90"],
        "bench_train": ["--out", "x.json", "--compile-timeout-s", "120"],
    }
    for name, argv in calls.items():
        assert f"benchmarks/{name}.py --out" in text, name
        assert " ".join(argv[2:]) in text, name
        _script(name).parse_args(argv + ["--budget-s", "100"])
    infer = ["--models", "large,hybrid", "--sizes", "384:16,1536:1,4k:1", "--skip", "hybrid@4k",
             "--compile-mode", "max-autotune",
             "--compile-fallback-mode", "default", "--warmup", "2", "--runs", "30", "--max-time", "3"]
    assert all(f"{flag} {value}" in text for flag, value in zip(infer[::2], infer[1::2]))
    import argparse
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(infer + ["--variants", "fused,reference,hf-sdpa,reference+compile",
                                      "--compile-timeout-s", "100", "--out", str(tmp_path), "--budget-s", "200"])
    assert args.budget_s == 200 and args.compile_fallback_mode == "default"
    assert bench.parse_configs(args.sizes, None)[-1] == ("4k", (2160, 3840), 1)
    # each stage writes a few files: log, extension, environment, junit (tests);
    # log + 3 JSON (kernels); log + bench JSON/MD/PNG + train JSON (e2e)
    assert "STAGE_BUDGET_S:-420" in text and "STAGE_BUDGET_S:-480" in text and 'tee "$OUT/suite-$stage.log"' in text


def test_gpu_benchmark_blocker_refuses_interpreter_and_quick_autotune(monkeypatch, capsys):
    harness = _script("harness")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks after the GPU one
    from dpt_fast import env  # the switches as read once at import (the kernels follow the same values)
    monkeypatch.setattr(env, "TRITON_INTERPRET", False)
    monkeypatch.setattr(env, "AUTOTUNE", "quick")
    assert "DPT_FAST_AUTOTUNE=quick" in harness.gpu_blocker()
    monkeypatch.setattr(env, "AUTOTUNE", "full")
    assert harness.gpu_blocker() is None
    monkeypatch.setattr(env, "AUTOTUNE", "fastest")  # not a mode: the reason, not a traceback
    assert "DPT_FAST_AUTOTUNE='fastest'" in harness.gpu_blocker()
    monkeypatch.setattr(env, "AUTOTUNE", "full")
    monkeypatch.setattr(env, "TRITON_INTERPRET", True)
    assert "TRITON_INTERPRET" in harness.gpu_blocker()
    assert harness.refuse_without_gpu("bench_x.py", smoke=False) == 2  # one line, exit status 2
    assert capsys.readouterr().err.startswith("bench_x.py: TRITON_INTERPRET=1")
    assert harness.refuse_without_gpu("bench_x.py", smoke=True) is None  # a dry run goes on
    monkeypatch.undo()
    env = bench.environment(torch.device("cpu"), torch.float32)
    assert env["autotune"] == "full"


def test_benchmark_scripts_import_only_public_names():
    """The scripts share benchmarks/harness.py and dpt_fast's public functions, never a module's private ones."""
    import ast
    for name in ("bench_attention", "bench_reassemble", "bench_rcu", "bench_train", "harness"):
        tree = ast.parse(open(os.path.join(ROOT, "benchmarks", f"{name}.py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpt_fast"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name}.py imports {private} from {node.module}"


def test_kernel_benchmark_records_failures_and_spent_budgets(tmp_path, capsys):
    import argparse
    harness = _script("harness")
    args = argparse.Namespace(smoke=True, out=str(tmp_path / "k.json"), budget_s=0.0, compile_timeout_s=10.0,
                              compile_mode="default")
    run = harness.KernelBenchmark("unit", args, "cpu", torch.float32)
    assert run.report["method"].startswith("--smoke dry run") and run.report["device_type"] == "cpu"

    def boom():
        raise RuntimeError("boom\nsecond line")
    assert run.attempt("case A", boom) is None  # recorded, the run goes on
    assert run.attempt("case B", lambda: {"ok": 1}) == {"ok": 1}
    row = {"fused_ms": 1.0}
    assert not run.time_compiled(row, lambda: 1.0, "case B")  # --budget-s 0: nothing left
    assert row["compiled_note"] == "skipped: time budget (--budget-s 0) spent"
    saved = json.loads((tmp_path / "k.json").read_text())
    assert saved["notes"] == ["failed: case A: RuntimeError: boom"] and not saved["complete"]
    run.account(row, {"dpt_fast::attention": {"reference": 2}}, ["dpt_fast::attention"])
    assert run.finish([row], lambda report: "table", "Triton") == 1  # a fused row served by the reference
    assert json.loads((tmp_path / "k.json").read_text())["complete"]
    assert "WARNING: the Triton path did not serve every call" in capsys.readouterr().err


def test_render_results_of_depth_anything_preset_runs(tmp_path):
    """--preset da runs: attention rows at several head counts (the run's heads a list), RCU rows at several
    widths. Each row is told apart in the tables; the RCU targets count only the 256-channel rows they state."""
    render = _script("render_results")
    ok = {"verified": True, "problems": []}

    def kernel_row(tokens, batch, heads, ratio):
        return {"tokens": tokens, "batch": batch, "heads": heads, "fused_path": ok,
                "vs_best_sdpa": {m: ratio for m in ("fwd", "bwd", "fwd_bwd")},
                "best_sdpa": {m: "cudnn" for m in ("fwd", "bwd", "fwd_bwd")},
                "tflops": {"dpt_fast": {"fwd": 300.0}}, "fraction_of_matmul_peak": {"fwd": 0.4}}
    attention = {"benchmark": "attention", **_fixture_env(), "dtype": "bf16", "heads": [6, 16], "head_dim": 64,
                 "preset": "da", "complete": True, "block": [],
                 "notes": ["failed: kernel N=10002 B=1 H=12: RuntimeError: boom"],
                 "kernel": [kernel_row(1370, 16, 6, 1.2), kernel_row(10002, 1, 16, 1.1)]}

    def rcu_row(size, channels, mode, ratio):
        return {"size": size, "batch": 16, "channels": channels, "mode": mode, "eager_ms": 1.0,
                "fused_ms": 1.0 / ratio, "speedup_vs_eager": ratio, "fused_path": ok, "compiled_ms": 1.0,
                "speedup_vs_compiled": 1.5}
    rcu = {"benchmark": "rcu", **_fixture_env(), "dtype": "bfloat16", "channels": [64, 256], "complete": True,
           "notes": ["skipped: time budget for eager/fused rows spent: 148^2 batch 1 fwd 64 channels"],
           "results": [rcu_row(148, 256, "fwd", 2.0), rcu_row(148, 64, "fwd", 0.8),
                       rcu_row(148, 256, "fwd+bwd", 1.3), rcu_row(148, 64, "fwd+bwd", 0.9)]}
    folder = tmp_path / "in"
    folder.mkdir()
    for name, doc in (("attention", attention), ("rcu", rcu)):
        (folder / f"{name}.json").write_text(json.dumps(doc))
    md = tmp_path / "R.md"
    assert render.main([str(folder), "--results-dir", str(tmp_path / "r"), "--markdown", str(md)]) == 0
    (merged,) = (tmp_path / "r").glob("*.json")
    t = _targets_by_start(json.loads(merged.read_text()))
    big = t("forward >= 1.0x the best SDPA backend, N >= 2305")
    assert big["worst_row"].startswith("N=10002 B=1 H=16") and big["status"] == "incomplete"  # H=12 failed
    assert t("forward >= 1.5x eager (cuDNN)")["status"] == "met"  # the 64-channel row (0.8x) is not its width
    assert t("forward+backward >= 1.2x eager")["status"] == "met"
    text = md.read_text()
    assert "#### Attention: bf16, 6/16 heads, head dim 64" in text and "| 1370 | 16 | 6 | fwd |" in text
    assert "| 148^2 | 16 | 64 | fwd |" in text and "| 148^2 | 16 | 256 | fwd |" in text
