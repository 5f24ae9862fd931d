"""The `dpt-fast` command starts at once: help and version without importing PyTorch, dpt_fast's public
names imported on first use."""
import os
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "timm", "numpy", "transformers", "matplotlib")


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_building_the_parser_imports_nothing_heavy():
    proc = _python("import sys\nfrom dpt_fast import cli\ncli._parser()\n"
                   f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["predict", "--help"], ["bench", "--help"],
                                  ["train", "--help"]])
def test_help_and_version_answer_without_torch(argv):
    code = ("import sys\nfrom dpt_fast.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules], code, file=sys.stderr)")
    started = time.perf_counter()
    proc = _python(code)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert "LOADED [] 0" in proc.stderr, proc.stderr
    assert ("dpt-fast 0." if argv == ["--version"] else "usage:") in proc.stdout
    # a generous bound for a loaded CI machine (it took ~14 s when the parser imported torch and timm)
    assert elapsed < 5, f"dpt-fast {' '.join(argv)} took {elapsed:.1f} s"


def test_console_script_help_is_quick():
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dpt_fast.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "predict" in proc.stdout and "bench" in proc.stdout
    assert time.perf_counter() - started < 5


def test_lazy_package_keeps_its_public_names():
    proc = _python(
        "import sys\nimport dpt_fast\n"
        "assert 'torch' not in sys.modules, 'import dpt_fast imported torch'\n"
        "assert set(dpt_fast.__all__) <= set(dir(dpt_fast))\n"
        "from dpt_fast import DPTDepthModel, load_model, use_backend, ops\n"
        "assert dpt_fast.DPTDepthModel is DPTDepthModel and dpt_fast.ops is ops\n"
        "assert dpt_fast.backend.get_backend() == 'fused'  # submodules as attributes, as before\n"
        "for name in dpt_fast.__all__:\n    getattr(dpt_fast, name)\n"
        "try:\n    dpt_fast.no_such_name\nexcept AttributeError as e:\n    print('ok', e)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok module 'dpt_fast' has no attribute 'no_such_name'")


def test_train_arguments_are_defined_once_without_torch():
    from dpt_fast import cli_args, data, train
    assert train.add_arguments is cli_args.add_train_arguments
    args = cli_args.train_parser().parse_args(["--data", "synthetic"])
    assert args.ignore_index == cli_args.TRAIN_IGNORE_INDEX == data.IGNORE_INDEX
    assert args.depth_loss in cli_args.TRAIN_DEPTH_LOSSES
