"""dpt_fast.env: every environment switch read once, at import, in one place."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dpt_fast import env

_PROBE = """
import json, os
from dpt_fast import env, backend
from dpt_fast.kernels import attention, reassemble
before = {"interpret": backend.triton_interpreting(), "autotune": env.autotune_mode(), "tma": env.attention_tma(),
          "split": env.reassemble_split_k(), "kernels_interpret": [attention._INTERPRET, reassemble._INTERPRET],
          "autotune_applied": [attention._AUTOTUNE, reassemble._AUTOTUNE]}
for name in ("TRITON_INTERPRET", "DPT_FAST_AUTOTUNE", "DPT_FAST_ATTENTION_TMA", "DPT_FAST_REASSEMBLE_SPLIT_K"):
    os.environ[name] = "junk"  # read once: a later change of the environment changes nothing
after = {"interpret": backend.triton_interpreting(), "autotune": env.autotune_mode(), "tma": env.attention_tma(),
         "split": env.reassemble_split_k()}
print(json.dumps([before, after]))
"""


def _probe(**switches):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DPT_FAST_") and k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], env={**environ, **switches}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_switches_are_read_once_and_reach_the_kernels():
    before, after = _probe(TRITON_INTERPRET="1", DPT_FAST_AUTOTUNE=" Quick ", DPT_FAST_ATTENTION_TMA="0",
                           DPT_FAST_REASSEMBLE_SPLIT_K="3")
    assert before == {"interpret": True, "autotune": "quick", "tma": False, "split": 3,
                      "kernels_interpret": [True, True], "autotune_applied": ["quick", "quick"]}
    assert after == {k: before[k] for k in after}
    defaults, _ = _probe(TRITON_INTERPRET="1")
    assert (defaults["autotune"], defaults["tma"], defaults["split"]) == ("full", True, None)


def test_values_parse_with_clear_errors(monkeypatch):
    monkeypatch.setattr(env, "REASSEMBLE_SPLIT_K", " 0 ")
    assert env.reassemble_split_k() == 1
    for bad, match in (("four", "expected an integer"), ("70000", "at most 65535")):
        monkeypatch.setattr(env, "REASSEMBLE_SPLIT_K", bad)
        with pytest.raises(ValueError, match=f"DPT_FAST_REASSEMBLE_SPLIT_K.*{match}"):
            env.reassemble_split_k()
    with pytest.raises(ValueError, match="DPT_FAST_AUTOTUNE='fast': expected one of full, quick"):
        env.autotune_mode("fast")
    monkeypatch.setattr(env, "ATTENTION_TMA", "0")
    assert env.attention_tma() is False
    monkeypatch.setattr(env, "REASSEMBLE_SPLIT_K", "")
    assert set(env.switches()) == {"TRITON_INTERPRET", "DPT_FAST_AUTOTUNE", "DPT_FAST_ATTENTION_TMA",
                                   "DPT_FAST_REASSEMBLE_SPLIT_K"}


def test_every_switch_is_documented_in_env_and_readme():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    table = readme[readme.index("### Environment switches"):]
    for name in ("TRITON_INTERPRET", "DPT_FAST_AUTOTUNE", "DPT_FAST_ATTENTION_TMA", "DPT_FAST_REASSEMBLE_SPLIT_K",
                 *env.BUILD_TIME):
        assert name in env.__doc__, name
        assert f"`{name}" in table, name


def test_a_benchmark_report_records_the_switches_as_dpt_fast_env_holds_them(monkeypatch):
    from dpt_fast import measure
    for name in ("TRITON_INTERPRET", "DPT_FAST_AUTOTUNE", "DPT_FAST_ATTENTION_TMA", "DPT_FAST_REASSEMBLE_SPLIT_K"):
        monkeypatch.delenv(name, raising=False)  # what the kernels follow is env's value, not the environment's
    monkeypatch.setattr(env, "TRITON_INTERPRET", True)
    monkeypatch.setattr(env, "AUTOTUNE", "Quick")
    monkeypatch.setattr(env, "ATTENTION_TMA", "0")
    monkeypatch.setattr(env, "REASSEMBLE_SPLIT_K", "4")
    report = measure.environment(torch.device("cpu"), torch.float32)
    assert (report["triton_interpret"], report["autotune"]) == (True, "quick")
    assert report["kernel_switches"] == {"DPT_FAST_ATTENTION_TMA": "0", "DPT_FAST_REASSEMBLE_SPLIT_K": "4"}
    monkeypatch.setattr(env, "ATTENTION_TMA", "1")  # the defaults are not recorded
    monkeypatch.setattr(env, "REASSEMBLE_SPLIT_K", "")
    assert measure.environment(torch.device("cpu"), torch.float32)["kernel_switches"] == {}
    monkeypatch.setattr(env, "AUTOTUNE", "fastest")  # not a mode: recorded as set, no traceback
    assert measure.environment(torch.device("cpu"), torch.float32)["autotune"] == "fastest"
