"""The repository's `kernels/` folder is installed as dpt_fast.kernels, but `python -m pytest` (the README's
test command) or a script run from the repository root also finds it as a top-level "kernels" package.
transformers imports a top-level "kernels" when probing for the unrelated hub-kernels distribution: that
import must not raise, or every transformers model fails to build from the repository root."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_module_imports_a_private_name_of_another():
    """A helper that another module needs has a public, documented name: `from .x import _y` would tie the
    importer to what x may change freely. (The compiled extension keeps torch's customary name, _C.)"""
    found = []
    for path in sorted(Path(ROOT, "dpt_fast").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                private = [a.name for a in node.names
                           if any(part.startswith("_") and not part.startswith("__") and part != "_C"
                                  for part in a.name.split("."))]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in private]
    assert not found, found


def test_transformers_builds_a_model_from_the_repository_root():
    code = (
        "import sys; sys.path.insert(0, '')\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('kernels') is not None  # the shadowing this test is about\n"
        "import kernels  # as transformers' probe does\n"
        "from transformers import DPTConfig, DPTForDepthEstimation\n"
        "DPTForDepthEstimation(DPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,\n"
        "    intermediate_size=32, image_size=32, patch_size=16, neck_hidden_sizes=[8, 8, 8, 8],\n"
        "    fusion_hidden_size=8, backbone_out_indices=[0, 0, 0, 0]))\n"
        "import dpt_fast.kernels\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
