"""Ahead-of-time compilation of the Triton attention kernels for Hopper (sm_90a), without a GPU.

    python tests/hopper_aot.py '[["_attention_fwd", 64, 0], ...]' [--jobs 2]

compiles each (kernel name, head dim, config) -- the config an index into
kernels.attention._FULL_CONFIGS[name][head dim] or an explicit [BLOCK_M, BLOCK_N, num_warps, num_stages] --
with triton.compile for GPUTarget("cuda", 90, 32), bf16 operands, the specialisation a launch on 16-byte
aligned tensors gets, and prints one JSON object {"name/D/index": facts}: whether the PTX uses wgmma,
cp.async and cp.async.bulk.tensor (TMA), the shared memory the kernel needs (bytes), and the registers and
spill bytes that `ptxas -v` (triton's own ptxas) reports for sm_90a. Run without TRITON_INTERPRET (the
tests start it in a subprocess). --jobs compiles in that many processes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile


def _signature(K, fn, head_dim, cfg):
    consts = {"HEAD_DIM": head_dim, **cfg.kwargs}
    if "DOT_PRECISION" in fn.arg_names:
        consts["DOT_PRECISION"] = "tf32"
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in K._TMA_BLOCK_ROWS:  # the block shape the autotune pre-hook gives this config
            sig[arg] = f"tensordesc<bf16[1,{cfg.kwargs[K._TMA_BLOCK_ROWS[arg]]},{head_dim}]>"
        elif arg in ("LSE", "Delta"):
            sig[arg] = "*fp32"
        elif arg in ("QKV", "Out", "DO", "DQKV"):
            sig[arg] = "*bf16"
        else:
            sig[arg] = "fp32" if "scale" in arg else "i32"
    return sig, consts


def ptxas_facts(ptxas: str, ptx: str) -> dict:
    """Registers and spill bytes of the PTX's kernels as `ptxas -v` reports them for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True)
    finally:
        os.remove(f.name)
    log = proc.stderr + proc.stdout
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    assert registers and stores and loads, f"unexpected ptxas -v output:\n{log}"
    return {"registers": max(registers), "spill_bytes": sum(stores) + sum(loads)}


def compile_one(job) -> tuple[str, dict]:
    name, head_dim, index = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    from dpt_fast.kernels import attention as K
    assert not K._INTERPRET, "run without TRITON_INTERPRET"
    kernel = getattr(K, name)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if not isinstance(kernel, Autotuner):
        cfg = triton.Config({"BLOCK_M": 64}, num_warps=4)
    elif isinstance(index, int):
        cfg = K._FULL_CONFIGS[name][head_dim][index]
    else:  # an explicit (BLOCK_M, BLOCK_N, num_warps, num_stages), listed or not
        cfg = triton.Config({"BLOCK_M": index[0], "BLOCK_N": index[1]}, num_warps=index[2], num_stages=index[3])
    sig, consts = _signature(K, fn, head_dim, cfg)
    # the specialization a launch on 16-byte aligned tensors with strides divisible by 16 gets
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in fn.arg_names
             if sig[a].startswith("*") or a.startswith("stride")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = compiled.asm["ptx"]
    facts = {"wgmma": "wgmma" in ptx, "cp_async": "cp.async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
             "shared": compiled.metadata.shared, "config": str(cfg),
             **ptxas_facts(knobs.nvidia.ptxas.path, ptx)}
    return f"{name}/{head_dim}/{index if isinstance(index, int) else '-'.join(map(str, index))}", facts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    jobs_arg = 1
    if "--jobs" in argv:
        i = argv.index("--jobs")
        jobs_arg = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    jobs = [tuple(j if not isinstance(j, list) else tuple(j) for j in job) for job in json.loads(argv[0])]
    if jobs_arg > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs_arg) as pool:
            results = pool.map(compile_one, jobs, chunksize=1)
    else:
        results = [compile_one(j) for j in jobs]
    print(json.dumps(dict(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
