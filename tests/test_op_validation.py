"""Operator input validation: one check per operator, run before any implementation.

Each bad call must raise the same ValueError whether the fused or the reference implementation would
serve it, through the public function and through the registered operator itself (torch.ops.dpt_fast.*).
Without a GPU the fused Reassemble and attention run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), where a mismatched readout weight used to crash the process and a grid larger than
the tokens read out of bounds; the checks now run before any launch, so these tests cost no kernel time.
"""
import importlib

import pytest
import torch

from dpt_fast import backend, ops, use_backend

# the operator modules (dpt_fast.ops exports functions of the same names)
attention_ops = importlib.import_module("dpt_fast.ops.attention")
rcu_ops = importlib.import_module("dpt_fast.ops.rcu")
reassemble_ops = importlib.import_module("dpt_fast.ops.reassemble")

FUSED_REACHABLE = torch.cuda.is_available() or backend.triton_interpreting()
BACKENDS = ["reference", "fused"]


def _errors(call):
    """The ValueError message of `call()` under each backend."""
    messages = []
    for name in BACKENDS:
        with use_backend(name), pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    return messages


# --- reassemble ----------------------------------------------------------------------------------

D, F, GRID = 8, 4, (2, 3)


def _reassemble(readout="project", resample="up2", **override):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = dict(tokens=rnd(2, 1 + GRID[0] * GRID[1], D), readout_weight=rnd(D, 2 * D), readout_bias=rnd(D),
                proj_weight=rnd(F, D, 1, 1), proj_bias=rnd(F), resample_weight=rnd(F, F, 2, 2),
                resample_bias=rnd(F), grid_h=GRID[0], grid_w=GRID[1], start_index=1, readout=readout,
                resample=resample)
    if resample == "down2":
        args["resample_weight"] = rnd(F, F, 3, 3)
    args.update(override)
    return tuple(args.values())


BAD_REASSEMBLE = {
    "readout weight [D, D]": (_reassemble(readout_weight=torch.randn(D, D)), "readout_weight must have shape"),
    "readout weight transposed": (_reassemble(readout_weight=torch.randn(2 * D, D)), "readout_weight must have shape"),
    "readout bias": (_reassemble(readout_bias=torch.randn(2 * D)), "readout_bias must have shape"),
    "missing readout bias": (_reassemble(readout_bias=None), "needs readout_weight and readout_bias"),
    "projection of another width": (_reassemble(proj_weight=torch.randn(F, D + 1, 1, 1)), "proj_weight must have shape"),
    "projection bias": (_reassemble(proj_bias=torch.randn(F + 1)), "proj_bias must have shape"),
    "up2 with a 4x4 kernel": (_reassemble(resample_weight=torch.randn(F, F, 4, 4)), "resample_weight must have shape"),
    "resample from another width": (_reassemble(resample_weight=torch.randn(F + 2, F, 2, 2)),
                                    "resample_weight must have shape"),
    "resample bias": (_reassemble(resample_bias=torch.randn(F + 1)), "resample_bias must have shape"),
    "down2 weight": (_reassemble(resample="down2", resample_weight=torch.randn(F, F + 1, 3, 3)),
                     "resample_weight must have shape"),
    "grid larger than the tokens": (_reassemble(grid_h=GRID[0] + 1), r"expects tokens \[B, 1 \+ 3\*3, D\]"),
    "unknown readout": (_reassemble(readout="projection"), "readout must be one of"),
    "unknown resample": (_reassemble(resample="up3"), "resample must be one of"),
    "integer tokens": (_reassemble(tokens=torch.zeros(2, 7, D, dtype=torch.long)), "floating-point tokens"),
}


def test_the_valid_reassemble_call_reaches_the_fused_path():
    """The bad calls below differ from this one in one argument: the fused kernel would have served them."""
    if not FUSED_REACHABLE:
        pytest.skip("the fused Reassemble needs CUDA or TRITON_INTERPRET=1")
    args = _reassemble()
    with use_backend("fused"):
        assert reassemble_ops._use_fused(args[0], args[10], args[11], args[1:7])
        backend.implementations_ran(reset=True)
        ops.reassemble(*args)
        assert backend.implementations_ran()["dpt_fast::reassemble"] == {"triton": 1}


@pytest.mark.parametrize("case", list(BAD_REASSEMBLE))
def test_reassemble_rejects_bad_input_the_same_way_on_every_path(case):
    args, match = BAD_REASSEMBLE[case]
    backend.implementations_ran(reset=True)
    public = _errors(lambda: ops.reassemble(*args))
    registered = _errors(lambda: torch.ops.dpt_fast.reassemble(*args))
    assert len(set(public + registered)) == 1, public + registered  # one message, whichever path
    assert pytest.raises(ValueError, ops.reassemble, *args).match(match)
    assert backend.implementations_ran() == {}  # nothing ran before the check


# --- attention -----------------------------------------------------------------------------------

BAD_ATTENTION = {
    "no heads": ((torch.randn(1, 5, 48), 0), "num_heads >= 1"),
    "2-D qkv": ((torch.randn(5, 48), 2), r"qkv of shape \[B, N, 3\*H\*D\]"),
    "width not 3*H*D": ((torch.randn(1, 5, 50), 2), r"qkv of shape \[B, N, 3\*H\*D\]"),
    "integer qkv": ((torch.zeros(1, 5, 48, dtype=torch.long), 2), "floating-point qkv"),
    "nan scale": ((torch.randn(1, 5, 48), 2, float("nan")), "finite scale"),
}


@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_attention_rejects_bad_input_the_same_way_on_every_path(case):
    args, match = BAD_ATTENTION[case]
    op_args = args if len(args) == 3 else (*args, 0.25)
    backend.implementations_ran(reset=True)
    public = _errors(lambda: ops.attention(*args))
    registered = _errors(lambda: torch.ops.dpt_fast.attention(*op_args))
    assert len(set(public + registered)) == 1, public + registered
    assert pytest.raises(ValueError, ops.attention, *args).match(match)
    assert backend.implementations_ran() == {}


def test_the_valid_attention_call_reaches_the_fused_path():
    if not FUSED_REACHABLE:
        pytest.skip("the fused attention needs CUDA or TRITON_INTERPRET=1")
    qkv = torch.randn(1, 5, 3 * 64)
    assert attention_ops._use_fused(qkv, 1) if backend.triton_interpreting() else True
    with use_backend("fused"):
        backend.implementations_ran(reset=True)
        ops.attention(qkv, 1)
        assert backend.implementations_ran()["dpt_fast::attention"] == {"triton": 1}


# --- residual conv unit ----------------------------------------------------------------------------

C = 8


def _rcu(**override):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = dict(x=rnd(2, C, 5, 6), weight1=rnd(C, C, 3, 3), bias1=rnd(C), weight2=rnd(C, C, 3, 3), bias2=rnd(C),
                extra=rnd(2, C, 5, 6))
    args.update(override)
    return tuple(args.values())


BAD_RCU = {
    "3-D x": (_rcu(x=torch.randn(C, 5, 6)), r"expects x \[B, C, H, W\]"),
    "weight1 of another width": (_rcu(weight1=torch.randn(C, C + 1, 3, 3)), "weight1 must have shape"),
    "weight2 5x5": (_rcu(weight2=torch.randn(C, C, 5, 5)), "weight2 must have shape"),
    "weight2 widening": (_rcu(weight2=torch.randn(2 * C, C, 3, 3)), "weight2 must have shape"),
    "bias1": (_rcu(bias1=torch.randn(C + 1)), "bias1 must have shape"),
    "bias2": (_rcu(bias2=torch.randn(1)), "bias2 must have shape"),
    "extra of another size": (_rcu(extra=torch.randn(2, C, 5, 7)), "extra must have x's shape"),
    "integer x": (_rcu(x=torch.zeros(2, C, 5, 6, dtype=torch.long)), "floating-point x"),
}


@pytest.mark.parametrize("case", list(BAD_RCU))
def test_rcu_rejects_bad_input_the_same_way_on_every_path(case):
    args, match = BAD_RCU[case]
    backend.implementations_ran(reset=True)
    public = _errors(lambda: ops.residual_conv_unit(*args))
    registered = _errors(lambda: torch.ops.dpt_fast.residual_conv_unit(*args))
    training = _errors(lambda: torch.ops.dpt_fast.residual_conv_unit_train(*args))
    assert len(set(public + registered + training)) == 1, public + registered + training
    assert pytest.raises(ValueError, ops.residual_conv_unit, *args).match(match)
    assert backend.implementations_ran() == {}


def test_validation_is_one_function_per_operator():
    """The fused and reference paths share the check: the registered operator bodies call the same function
    the public ones do (the kernels never see unchecked shapes)."""
    import inspect
    for module, check in ((reassemble_ops, "check_reassemble_args"), (attention_ops, "check_attention_args"),
                          (rcu_ops, "check_rcu_args")):
        source = inspect.getsource(module)
        assert source.count(f"{check}(") >= 3, module.__name__  # definition, public function, operator body
