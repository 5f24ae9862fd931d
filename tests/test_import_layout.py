"""The repository's `kernels/` folder is installed as dpt_fast.kernels, but `python -m pytest` (the README's
test command) or a script run from the repository root also finds it as a top-level "kernels" package.
transformers imports a top-level "kernels" when probing for the unrelated hub-kernels distribution: that
import must not raise, or every transformers model fails to build from the repository root."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
