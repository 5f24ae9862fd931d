"""The reference operators: definitions checked against independent PyTorch code, and opcheck."""
import pytest
import torch
import torch.nn.functional as F

from dpt_fast import get_backend, implementations_ran, ops, reference, use_backend
from dpt_fast.ops.attention import attention_op
from dpt_fast.ops.reassemble import reassemble_op
from dpt_fast.ops.rcu import residual_conv_unit_op, residual_conv_unit_train_op
from dpt_fast.reference import rcu as reference_rcu


def _sdpa(qkv, heads):
    b, n, c = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, c // (3 * heads)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c // 3)


@pytest.mark.parametrize("tokens", [1, 17, 77])
def test_attention_matches_sdpa_forward_and_backward(tokens):
    torch.manual_seed(tokens)
    qkv = torch.randn(2, tokens, 3 * 3 * 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, tokens, 3 * 16, dtype=torch.float64)
    out = ops.attention(qkv, 3)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    expected = _sdpa(qkv, 3)
    (expected_dqkv,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dqkv, expected_dqkv)


def test_attention_query_blocks_do_not_change_the_result(monkeypatch):
    qkv = torch.randn(1, 50, 3 * 2 * 8, dtype=torch.float64)
    whole, lse_whole = reference.attention(qkv, 2, 0.3)
    import sys
    monkeypatch.setattr(sys.modules["dpt_fast.reference.attention"], "_SCORE_ELEMENTS", 7 * 2 * 50)
    blocked, lse_blocked = reference.attention(qkv, 2, 0.3)
    torch.testing.assert_close(whole, blocked)
    torch.testing.assert_close(lse_whole, lse_blocked)


def test_attention_opcheck():
    qkv = torch.randn(2, 13, 3 * 2 * 8, requires_grad=True)
    torch.library.opcheck(attention_op, (qkv, 2, 0.25))


def _reassemble_params(dim, features, readout, resample, dtype=torch.float32):
    rw = torch.randn(dim, 2 * dim, dtype=dtype) * 0.1 if readout == "project" else None
    rb = torch.randn(dim, dtype=dtype) if readout == "project" else None
    pw = torch.randn(features, dim, 1, 1, dtype=dtype) * 0.1
    pb = torch.randn(features, dtype=dtype)
    if resample in ("up4", "up2"):
        k = 4 if resample == "up4" else 2
        sw, sb = torch.randn(features, features, k, k, dtype=dtype) * 0.1, torch.randn(features, dtype=dtype)
    elif resample == "down2":
        sw, sb = torch.randn(features, features, 3, 3, dtype=dtype) * 0.1, torch.randn(features, dtype=dtype)
    else:
        sw = sb = None
    return rw, rb, pw, pb, sw, sb


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
@pytest.mark.parametrize("resample", ["up4", "up2", "none", "down2"])
def test_reassemble_matches_module_chain(readout, resample):
    torch.manual_seed(0)
    gh, gw, dim, feat = 3, 5, 16, 8
    tokens = torch.randn(2, 1 + gh * gw, dim, dtype=torch.float64)
    rw, rb, pw, pb, sw, sb = _reassemble_params(dim, feat, readout, resample, torch.float64)
    out = ops.reassemble(tokens, rw, rb, pw, pb, sw, sb, gh, gw, 1, readout, resample)
    # the original's module chain, written independently
    x = tokens[:, 1:]
    if readout == "add":
        x = x + tokens[:, 0].unsqueeze(1)
    elif readout == "project":
        x = F.gelu(torch.cat((x, tokens[:, 0].unsqueeze(1).expand_as(x)), -1) @ rw.T + rb)
    x = x.transpose(1, 2).unflatten(2, (gh, gw))
    x = torch.nn.functional.conv2d(x, pw, pb)
    if resample == "up4":
        x = F.conv_transpose2d(x, sw, sb, stride=4)
    elif resample == "up2":
        x = F.conv_transpose2d(x, sw, sb, stride=2)
    elif resample == "down2":
        x = F.conv2d(x, sw, sb, stride=2, padding=1)
    torch.testing.assert_close(out, x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("readout,resample", [("project", "up4"), ("add", "down2"), ("ignore", "none")])
def test_reassemble_opcheck(readout, resample):
    gh, gw, dim, feat = 3, 5, 8, 4
    tokens = torch.randn(2, 1 + gh * gw, dim, requires_grad=True)
    params = [p.requires_grad_(True) if p is not None else None
              for p in _reassemble_params(dim, feat, readout, resample)]
    torch.library.opcheck(reassemble_op, (tokens, *params, gh, gw, 1, readout, resample))


def _rcu_inputs(channels=8, h=7, w=9, dtype=torch.float64, channels_last=False):
    x = torch.randn(2, channels, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1, w2 = (torch.randn(channels, channels, 3, 3, dtype=dtype) * 0.2 for _ in range(2))
    b1, b2 = (torch.randn(channels, dtype=dtype) for _ in range(2))
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("with_extra", [False, True])
def test_rcu_matches_original_module_order(with_extra):
    x, w1, b1, w2, b2 = _rcu_inputs()
    extra = torch.randn_like(x) if with_extra else None
    out = ops.residual_conv_unit(x, w1, b1, w2, b2, extra)
    h = F.conv2d(F.relu(x), w1, b1, padding=1)
    expected = F.conv2d(F.relu(h), w2, b2, padding=1) + x
    if with_extra:
        expected = extra + expected
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rcu_opcheck(with_extra, channels_last):
    x, w1, b1, w2, b2 = (t.float().requires_grad_(True) for t in _rcu_inputs(channels_last=channels_last))
    extra = torch.randn_like(x).requires_grad_(True) if with_extra else None
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(residual_conv_unit_op, (x, w1, b1, w2, b2, extra))


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rcu_train_opcheck(with_extra, channels_last):
    torch.manual_seed(11)
    x, w1, b1, w2, b2 = (t.float() for t in _rcu_inputs(channels=5, h=7, w=3, channels_last=channels_last))
    extra = torch.randn_like(x) if with_extra else None
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2, extra) if t is not None]
    assert len(leaves) == 5 + with_extra
    torch.library.opcheck(residual_conv_unit_train_op, (x, w1, b1, w2, b2, extra))


def test_rcu_backward_op_with_hidden_opcheck():
    torch.manual_seed(12)
    x, w1, b1, w2, b2 = (t.float() for t in _rcu_inputs(channels=5, h=7, w=3))
    hidden = reference_rcu.residual_conv_unit_hidden(x, w1, b1)
    grad = torch.randn_like(x)
    torch.library.opcheck(torch.ops.dpt_fast.residual_conv_unit_backward.default,
                          (grad, x, w1, b1, w2, b2, True, "reference", hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_extra", [False, True])
def test_rcu_train_op_matches_the_recomputing_op(dtype, with_extra):
    """The training operator (hidden kept for the backward) and the inference operator (its backward
    recomputes hidden) give the same output and the same gradients, and hidden is the reference's."""
    torch.manual_seed(13)
    inputs = list(_rcu_inputs(channels=6, h=7, w=5, dtype=dtype))
    inputs.append(torch.randn_like(inputs[0]) if with_extra else None)
    grad = torch.randn_like(inputs[0])

    def leaves():
        return [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]

    train_in, plain_in = leaves(), leaves()
    out, hidden = residual_conv_unit_train_op(*train_in)
    assert not hidden.requires_grad and hidden.grad_fn is None  # not differentiable
    torch.testing.assert_close(hidden, reference_rcu.residual_conv_unit_hidden(*inputs[:3]), rtol=0, atol=0)
    assert hidden.stride() == inputs[0].stride()
    expected = residual_conv_unit_op(*plain_in)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    got = torch.autograd.grad(out, [t for t in train_in if t is not None], grad)
    want = torch.autograd.grad(expected, [t for t in plain_in if t is not None], grad)
    assert len(got) == 5 + with_extra
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("with_extra", [False, True])
def test_rcu_train_path_gradcheck(with_extra):
    """ops.residual_conv_unit with inputs that require grad runs the training operator: gradcheck it
    (first order; the backward operator has no autograd of its own)."""
    torch.manual_seed(14)
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in _rcu_inputs(channels=3, h=5, w=3))
    extra = torch.randn_like(x).requires_grad_(True) if with_extra else None
    assert ops.residual_conv_unit(x, w1, b1, w2, b2, extra).grad_fn.name().startswith(
        "GeneratedBackwardFor_dpt_fast_residual_conv_unit_train")
    assert torch.autograd.gradcheck(ops.residual_conv_unit, (x, w1, b1, w2, b2, extra))


def test_rcu_reference_backward_with_hidden_equals_recompute():
    torch.manual_seed(15)
    x, w1, b1, w2, b2 = _rcu_inputs(channels=7, h=9, w=5)
    grad = torch.randn_like(x)
    hidden = reference_rcu.residual_conv_unit_hidden(x, w1, b1)
    recomputed = reference.residual_conv_unit_backward(grad, x, w1, b1, w2, b2, False)
    kept = reference.residual_conv_unit_backward(grad, x, w1, b1, w2, b2, False, hidden)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the kept hidden is used, not recomputed: a different hidden changes the weight gradients
    other = reference.residual_conv_unit_backward(grad, x, w1, b1, w2, b2, False, hidden * 1.5)
    assert not torch.equal(other[3], recomputed[3])


def test_rcu_gradients_match_autograd_of_the_definition():
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in _rcu_inputs())
    extra = torch.randn_like(x).requires_grad_(True)
    grad = torch.randn_like(x)
    got = torch.autograd.grad(ops.residual_conv_unit(x, w1, b1, w2, b2, extra), (x, w1, b1, w2, b2, extra), grad)
    h = F.conv2d(F.relu(x), w1, b1, padding=1)
    expected_out = extra + (F.conv2d(F.relu(h), w2, b2, padding=1) + x)
    expected = torch.autograd.grad(expected_out, (x, w1, b1, w2, b2, extra), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_use_backend_is_a_context_manager_and_per_thread():
    import threading
    from dpt_fast import get_backend
    assert get_backend() == "fused"
    seen = []
    with use_backend("reference"):
        assert get_backend() == "reference"
        t = threading.Thread(target=lambda: seen.append(get_backend()))
        t.start(); t.join()
    assert seen == ["fused"]  # another thread is not affected by this thread's context manager
    assert get_backend() == "fused"
    with pytest.raises(ValueError, match="backend must be one of"):
        use_backend("cudnn")


def test_use_backend_as_a_decorator_chooses_for_each_call_only():
    assert get_backend() == "fused"

    @use_backend("reference")
    def inside():
        return get_backend()
    assert get_backend() == "fused"  # defining it changes nothing
    assert inside() == "reference" and inside() == "reference"
    assert get_backend() == "fused"
    setter = use_backend("inline")  # the plain-setter form
    assert get_backend() == "inline"
    with setter:
        pass
    assert get_backend() == "fused"
    with setter:  # the same object entered again sets it again
        assert get_backend() == "inline"
    assert get_backend() == "fused"


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
@pytest.mark.parametrize("resample", ["up4", "up2", "none", "down2"])
def test_reassemble_backward_passes_gradcheck(readout, resample):
    torch.manual_seed(1)
    gh, gw, dim, feat = 3, 2, 4, 3
    tokens = torch.randn(2, 1 + gh * gw, dim, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_(True) if p is not None else None
              for p in _reassemble_params(dim, feat, readout, resample, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda t, *p: ops.reassemble(t, *p, gh, gw, 1, readout, resample), (tokens, *params))


def test_rcu_and_attention_backward_pass_gradcheck():
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in _rcu_inputs(channels=3, h=4, w=5))
    extra = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.residual_conv_unit, (x, w1, b1, w2, b2, extra))
    qkv = torch.randn(1, 5, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.attention(t, 2), (qkv,))


def test_operators_run_in_the_autocast_dtype_and_train_float32_weights():
    """Under autocast the ops see bf16 activations and float32 weights: they compute in bf16 (as aten's
    conv does) and the weights' gradients come back float32, close to the float32 result."""
    torch.manual_seed(5)
    x, w1, b1, w2, b2 = (t.float().requires_grad_(True) for t in _rcu_inputs(channels=8))
    tokens = torch.randn(2, 1 + 3 * 5, 16, requires_grad=True)
    params = [p.requires_grad_(True) if p is not None else None for p in _reassemble_params(16, 8, "project", "up2")]

    def run():
        rcu = ops.residual_conv_unit(x, w1, b1, w2, b2)
        stage = ops.reassemble(tokens, *params, 3, 5, 1, "project", "up2")
        (rcu.float().square().mean() + stage.float().square().mean()).backward()
        return rcu, stage, [t.grad.clone() for t in (w1, params[0], params[3])]

    ref_rcu, ref_stage, ref_grads = run()
    for t in (x, w1, b1, w2, b2, tokens, *[p for p in params if p is not None]):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rcu, stage, grads = run()
    assert rcu.dtype == torch.bfloat16 and stage.dtype == torch.bfloat16
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert ((g - r).norm() / r.norm()).item() < 3e-2
    assert ((stage.float() - ref_stage).norm() / ref_stage.norm()).item() < 2e-2


@pytest.mark.parametrize("shape,heads,match", [((2, 5, 48), 0, "num_heads"), ((2, 5, 50), 2, "3\\*H\\*D"),
                                               ((5, 48), 2, "3\\*H\\*D")])
def test_attention_rejects_bad_shapes_clearly(shape, heads, match):
    with pytest.raises(ValueError, match=match):
        ops.attention(torch.randn(shape), heads)


# --- the "inline" backend: the reference math as plain PyTorch, no operator call -------------------

def _reassemble_args(readout="project", resample="up2", grid=(3, 5), dim=16, features=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    tokens = rnd(2, 1 + grid[0] * grid[1], dim)
    rw, rb = (rnd(dim, 2 * dim), rnd(dim)) if readout == "project" else (None, None)
    if resample in ("up4", "up2"):
        k = 4 if resample == "up4" else 2
        sw, sb = rnd(features, features, k, k), rnd(features)
    elif resample == "down2":
        sw, sb = rnd(features, features, 3, 3), rnd(features)
    else:
        sw = sb = None
    return (tokens, rw, rb, rnd(features, dim, 1, 1), rnd(features), sw, sb, *grid, 1, readout, resample)


@pytest.mark.parametrize("attention_form", ["matmul", "sdpa"])
def test_inline_backend_is_the_reference_without_any_operator_call(attention_form):
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 9, 3 * 2 * 8, generator=gen, dtype=torch.float64)
    rcu = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((2, 4, 5, 6), (4, 4, 3, 3), (4,), (4, 4, 3, 3), (4,))]
    extra = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    with use_backend("reference"):
        expected = (ops.attention(qkv, 2), ops.reassemble(*_reassemble_args()), ops.residual_conv_unit(*rcu, extra))
    implementations_ran(reset=True)
    with use_backend("inline", inline_attention=attention_form):
        got = (ops.attention(qkv, 2), ops.reassemble(*_reassemble_args()), ops.residual_conv_unit(*rcu, extra))
        assert get_backend() == "inline"
    assert implementations_ran() == {}  # not one registered operator ran
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert get_backend() == "fused"


def test_inline_backend_traces_to_plain_aten_ops_and_trains():
    """torch.export of the public ops under "inline" holds no dpt_fast operator, and autograd runs through
    the plain form (no training operator)."""
    rcu = [torch.randn(s, dtype=torch.float64) for s in ((1, 4, 5, 6), (4, 4, 3, 3), (4,), (4, 4, 3, 3), (4,))]

    class Ops(torch.nn.Module):
        def forward(self, qkv, x):
            return ops.attention(qkv, 2).sum() + ops.residual_conv_unit(x, *rcu[1:]).sum()

    qkv = torch.randn(2, 9, 48, dtype=torch.float64)
    with use_backend("inline"):
        program = torch.export.export(Ops(), (qkv, rcu[0]))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("dpt_fast" in t for t in targets), targets
        x = rcu[0].clone().requires_grad_()
        implementations_ran(reset=True)
        ops.residual_conv_unit(x, *rcu[1:]).sum().backward()
        assert implementations_ran() == {} and x.grad is not None


def test_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        use_backend("plain")
    with pytest.raises(ValueError, match="inline_attention must be one of"):
        use_backend("inline", inline_attention="flash")
    assert get_backend() == "fused"
