"""`dpt-fast bench` in its tiny CPU setting, and the pieces it is built from."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dpt_fast import DPTDepthModel, backend, bench, cli, use_backend

TINY = dict(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11], features=32)


def test_bench_tiny_cpu_writes_json_table_and_plot(tmp_path):
    # As CI runs it (README's install line): a fresh process, Triton kernels not interpreted, so the fused
    # variant falls back to the reference on CPU -- and must say so.
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "dpt_fast.cli", "bench", "--tiny", "--device", "cpu", "--sizes", "64",
           "--runs", "2", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "| tiny | 64x64 | 2 | fused |" in proc.stdout
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
    variants = {r["variant"]: r for r in report["results"]}
    expected = {"fused", "reference"} | ({"hf-sdpa"} if env["versions"]["transformers"] else set())
    assert set(variants) == expected
    for r in variants.values():
        assert r["error"] is None, r
        assert r["model"] == "tiny" and r["size"] == [64, 64] and r["batch"] == 2
        assert r["latency_ms"] > 0 and r["images_per_s"] > 0 and r["runs"] >= 2
        assert r["flops"] > 0 and r["tflops"] > 0
        assert r["output_shape"] == [2, 64, 64] and r["output_finite"]
        assert r["implementations"]
    assert set(variants["fused"]["speedup"]) >= {"reference"}
    ran = variants["reference"]["implementations"]
    assert set(ran) == {"dpt_fast::attention", "dpt_fast::reassemble", "dpt_fast::residual_conv_unit"}
    assert all(set(impls) == {"reference"} for impls in ran.values())
    assert set(variants["fused"]["implementations"]["dpt_fast::attention"]) == {"reference"}  # recorded, not hidden
    table = files[".md"].read_text()
    assert "| tiny | 64x64 | 2 | fused |" in table and env["versions"]["torch"] in table


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


def test_bench_rejects_unknown_model(capsys):
    assert cli.main(["bench", "--models", "gigantic", "--device", "cpu"]) == 2
    assert "unknown model" in capsys.readouterr().err
