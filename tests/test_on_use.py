"""perturb='on_use': every use of a parameter served its perturbed values, the parameters never written.

Against ``perturb='copy'`` (the reference: the same stream elements into a scratch copy) bit for bit
for the full-rank distributions, within rounding for LowRank; against autograd on a quadratic.
"""

import ctypes
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS
from torch import nn

import zo_kernels
from zo_kernels import distributions

FULL_RANK = [distributions.Normal(), distributions.Rademacher(), distributions.Sphere()]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
METHODS = ["naive", "forward", "antithetic"]


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    return net.to(dtype)


def functional_loss(net: nn.Module):
    names = [n for n, _ in net.named_parameters()]

    def loss(params, x):
        out = torch.func.functional_call(net, dict(zip(names, params)), (x,))
        return out.float().pow(2).mean()

    return loss


def versions(params):
    return [p._version for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dist", FULL_RANK, ids=repr)
def test_on_use_equals_copy_bit_for_bit(dist, method, dtype, backend):
    net = mlp(dtype)
    params = list(net.parameters())
    before, seen = [p.detach().clone() for p in params], versions(params)
    x = torch.randn(5, 6, dtype=dtype)
    kw = dict(distribution=dist, method=method, num_samples=5, sigma=0.05, seed=11, backend=backend)
    copy = zo_kernels.estimate(functional_loss(net), params, x, **kw)
    on_use = zo_kernels.estimate(functional_loss(net), params, x, perturb="on_use", **kw)
    assert torch.equal(on_use.weights, copy.weights)
    assert on_use == copy
    assert versions(params) == seen
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_lowrank_on_use_equals_copy_within_rounding(method, dtype):
    """LowRank's served products round the shared product and the low-rank term separately."""
    net = mlp(dtype)
    params = list(net.parameters())
    seen = versions(params)
    x = torch.randn(5, 6, dtype=dtype)
    kw = dict(distribution=distributions.LowRank(2), method=method, num_samples=6, sigma=0.05, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every use is rewritten: no matrix is materialized
        on_use = zo_kernels.estimate(functional_loss(net), params, x, perturb="on_use", **kw)
    copy = zo_kernels.estimate(functional_loss(net), params, x, **kw)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 0.05)
    scale = copy.weights.abs().max().item()
    torch.testing.assert_close(on_use.weights, copy.weights, rtol=tol, atol=tol * scale)
    assert versions(params) == seen


@pytest.mark.filterwarnings("ignore:zo_kernels. LowRank. `sub`")  # an elementwise use: materialized, as documented
@pytest.mark.parametrize("dist", [*FULL_RANK, distributions.LowRank(1)], ids=repr)
def test_the_decorator_gradient_matches_copy_and_autograd(dist):
    """The gradient written by backward: as copy's (same losses; the CPU's kept normal noise is summed by
    matrix products there, regenerated here, so equal to float32 rounding), and near the true gradient."""
    torch.manual_seed(1)
    a = torch.randn(4, 3)
    target = torch.randn(4, 3)

    def loss(w):
        return ((w - target) * a).pow(2).sum()

    grads = {}
    for mode in ("copy", "on_use"):
        w = torch.zeros(4, 3, requires_grad=True)
        fn = zo_kernels.zero_order(dist, "antithetic", num_samples=4000, sigma=1e-3, seed=2, perturb=mode)(loss)
        fn(w).backward()
        assert w._version == 0 and torch.equal(w.detach(), torch.zeros(4, 3))
        grads[mode] = w.grad
    torch.testing.assert_close(grads["on_use"], grads["copy"], rtol=1e-5, atol=1e-5)
    exact = 2 * a * a * (0 - target)
    assert torch.linalg.vector_norm(grads["on_use"] - exact) < 0.15 * torch.linalg.vector_norm(exact)


def test_rademacher_gradient_is_copys_bit_for_bit():
    """Where copy regenerates its noise in reduce too, the written gradients are identical."""
    net = mlp(torch.float32)
    x = torch.randn(5, 6)
    grads = {}
    for mode in ("copy", "on_use"):
        params = [p.detach().clone().requires_grad_() for p in net.parameters()]
        fn = zo_kernels.zero_order(distributions.Rademacher(), "antithetic", num_samples=6, sigma=0.05, seed=3,
                                   perturb=mode)(functional_loss(net))  # fmt: skip
        fn(params, x).backward()
        grads[mode] = [p.grad for p in params]
    assert all(torch.equal(a, b) for a, b in zip(grads["on_use"], grads["copy"]))


def test_a_function_that_ignores_params_and_calls_the_model_is_perturbed():
    """MeZO's style: the loss calls the module, which holds the parameters; on_use serves those uses."""
    net = mlp(torch.bfloat16)
    params = list(net.parameters())
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    kw = dict(method="antithetic", num_samples=4, sigma=0.05, seed=7)
    closure = zo_kernels.estimate(lambda ps, x: net(x).float().pow(2).mean(), params, x, perturb="on_use", **kw)
    copy = zo_kernels.estimate(functional_loss(net), params, x, **kw)
    assert closure == copy


def test_repeated_and_tied_uses_see_identical_values():
    """A weight read at every step of a recurrence (and as its own transpose) is regenerated identically."""
    torch.manual_seed(3)
    w = torch.randn(8, 8) * 0.3
    xs = torch.randn(5, 2, 8)

    def rnn(params, xs):
        (w,) = params
        h = torch.zeros(2, 8)
        for x in xs:
            h = torch.tanh(x + h @ w.T + F.linear(h, w))
        return h.pow(2).sum()

    kw = dict(method="antithetic", num_samples=6, sigma=0.01, seed=9)
    assert zo_kernels.estimate(rnn, [w], xs, perturb="on_use", **kw) == zo_kernels.estimate(rnn, [w], xs, **kw)


def test_a_parameter_no_operation_reads_is_named_in_a_warning():
    a, b = torch.randn(3), torch.randn(2)

    def loss(params):
        first, _ = params
        return first.pow(2).sum()  # params[1] unused: evaluated unperturbed

    with pytest.warns(RuntimeWarning, match=r"perturb='on_use': leaf 1 \(a \[2\] torch.float32 tensor\)"):
        zo_kernels.estimate(loss, [a, b], num_samples=2, perturb="on_use")


def test_a_parameter_read_behind_the_mode_is_detected():
    """A read the mode cannot see: the storage read through the data pointer, as a C++ extension would."""
    w = torch.randn(4)

    def loss(params):
        (p,) = params
        values = np.ctypeslib.as_array(ctypes.cast(p.data_ptr(), ctypes.POINTER(ctypes.c_float)), shape=(4,))
        return torch.tensor(float((values**2).sum()))

    with pytest.warns(RuntimeWarning, match=r"leaf 0 .* was not read by any torch operation"):
        zo_kernels.estimate(loss, [w], num_samples=2, perturb="on_use")


@pytest.mark.parametrize("failure", ["exception", "keyboard_interrupt", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_failure_at_any_sample_leaves_the_parameters_bit_identical(failure, dtype):
    net = mlp(dtype)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    before = [p.detach().clone() for p in params]
    x = torch.randn(5, 6, dtype=dtype)
    inner = functional_loss(net)
    calls = []

    def loss(ps, x):
        calls.append(1)
        if len(calls) == 4:  # the 3rd perturbed evaluation
            if failure == "exception":
                raise ValueError("boom")
            if failure == "keyboard_interrupt":
                raise KeyboardInterrupt
            return inner(ps, x) * float("nan")
        return inner(ps, x)

    fn = zo_kernels.zero_order(distributions.Normal(), "antithetic", num_samples=4, sigma=0.1, perturb="on_use")(loss)
    out = fn(params, x)
    expected = {"exception": ValueError, "keyboard_interrupt": KeyboardInterrupt, "nan": zo_kernels.NonFiniteLossError}
    with pytest.raises(expected[failure]):
        out.backward()
    for p, b in zip(params, before):
        assert p.grad is None and p._version == 0 and torch.equal(p.detach(), b)  # never written


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(perturb="on_use", inplace=True), ValueError, r"inplace=True is the alias of perturb='inplace'"),
        (dict(perturb="on_use", batch_size=4), ValueError, r"batch_size cannot be combined with perturb='on_use'"),
    ],
)
def test_contradictory_options_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        zo_kernels.zero_order(distributions.Normal(), **kwargs)
    with pytest.raises(exc, match=match):
        zo_kernels.estimate(lambda p: p.sum(), torch.ones(2), **kwargs)


def test_user_distributions_cannot_be_served():
    with pytest.raises(ValueError, match=r"perturb='on_use' needs a built-in distribution"):
        zo_kernels.zero_order(torch.distributions.Laplace(0.0, 1.0), perturb="on_use")


def test_the_same_tensor_twice_is_refused():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"leaves 0 and 1 are the same tensor"):
        fn = zo_kernels.zero_order(distributions.Normal(), argnums=(0, 1), perturb="on_use")(lambda a, b: (a * b).sum())
        fn(w, w)


def test_create_graph_and_torch_func_are_refused_with_the_reason():
    w = torch.ones(3, requires_grad=True)
    fn = zo_kernels.zero_order(distributions.Normal(), num_samples=2, perturb="on_use")(lambda w: w.pow(2).sum())
    with pytest.raises(RuntimeError, match=r"perturb='on_use' cannot give"):
        torch.autograd.grad(fn(w), w, create_graph=True)
    with pytest.raises(RuntimeError, match=r"perturb='on_use' cannot give"):
        torch.func.grad(fn)(torch.ones(3))


def test_lowrank_batches_are_allowed_and_equal_the_loop():
    net = mlp(torch.float32)
    params = list(net.parameters())
    seen = versions(params)
    x = torch.randn(5, 6)
    kw = dict(distribution=distributions.LowRank(2), method="antithetic", num_samples=6, sigma=0.05, seed=5)
    loop = zo_kernels.estimate(functional_loss(net), params, x, perturb="on_use", **kw)
    batch = zo_kernels.estimate(functional_loss(net), params, x, perturb="on_use", batch_size=4, **kw)
    torch.testing.assert_close(batch.weights, loop.weights, rtol=1e-4, atol=1e-6)
    assert versions(params) == seen


@pytest.mark.parametrize(
    ("hold", "values"),
    [
        (lambda w, x: w.T, lambda held: held.T),  # a view
        (lambda w, x: w.contiguous(), lambda held: held),  # the served tensor itself
        (lambda w, x: (x.requires_grad_() @ w).grad_fn, lambda held: held._saved_mat2),  # saved by autograd
    ],
    ids=["view", "itself", "saved-by-autograd"],
)
def test_a_served_buffer_still_held_is_never_reused(hold, values):
    """Served values go into buffers reused between operations, but only once nothing holds them."""
    from zo_kernels.noise.shared_weights import SharedWeights, Transients

    w, x = torch.randn(8, 8), torch.randn(3, 8)
    pool = Transients(1 << 20)
    first = SharedWeights(transients=pool)
    first.track_values(w, lambda out: torch.add(w, 1, out=out))
    with first, torch.enable_grad():
        held = hold(w, x)
    second = SharedWeights(transients=pool)
    second.track_values(w, lambda out: torch.add(w, 2, out=out))
    with second:
        for _ in range(3):
            F.linear(x, w)
    assert torch.equal(values(held), w + 1)
    assert pool.used_bytes == 0


def test_a_buffer_nothing_holds_is_reused():
    from zo_kernels.noise.shared_weights import SharedWeights, Transients

    w, x = torch.randn(8, 8), torch.randn(3, 8)
    pool, taken = Transients(1 << 20), []
    mode = SharedWeights(transients=pool)
    mode.track_values(w, lambda out: taken.append(out.data_ptr()) or torch.add(w, 1, out=out))
    b = torch.randn(8)
    mode.track_values(b, lambda out: taken.append(out.data_ptr()) or torch.add(b, 1, out=out))
    with mode:
        F.linear(x, w)
        b.sum()  # a smaller use served from the same buffer
        F.linear(x, w)  # kept from here on: a repeated use
    assert taken[0] == taken[1] == taken[2] and pool.used_bytes == 0 and pool.free_bytes == w.numel() * 4


def test_a_torch_compiled_module_is_served_too():
    """Dynamo traces through the mode: the compiled module's uses of the weights get the perturbed values."""
    torch.manual_seed(0)
    lin, x = nn.Linear(8, 4), torch.randn(3, 8)
    compiled = torch.compile(lin, backend="eager")
    kw = dict(num_samples=3, sigma=0.1, seed=1, perturb="on_use")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unread parameter, no graph-break warning
        through_compile = zo_kernels.estimate(lambda ps, x: compiled(x).pow(2).sum(), list(lin.parameters()), x, **kw)
    assert through_compile == zo_kernels.estimate(lambda ps, x: lin(x).pow(2).sum(), list(lin.parameters()), x, **kw)


@pytest.mark.parametrize("rows", [True, False], ids=["looked-up-rows", "whole-table"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_embedding_lookup_is_served_its_rows_bit_for_bit(rows, dtype, monkeypatch):
    """A lookup of few ids in a large table is served those rows only; the values are copy's either way."""
    from zo_kernels.noise import shared_weights, stream

    monkeypatch.setattr(shared_weights, "ROW_CALL_ELEMENTS", 0 if rows else 1 << 40)
    looked_up = []
    original = stream._Use.rows
    monkeypatch.setattr(stream._Use, "rows", lambda use, shape, ids: looked_up.append(ids) or original(use, shape, ids))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(4096, 8), nn.Linear(8, 3)).to(dtype)
    params, ids = list(net.parameters()), torch.tensor([[3, 4095, 3, 17]])
    kw = dict(method="antithetic", num_samples=3, sigma=0.05, seed=4)
    on_use = zo_kernels.estimate(lambda ps, ids: net(ids).float().pow(2).mean(), params, ids, perturb="on_use", **kw)
    assert on_use == zo_kernels.estimate(functional_loss(net), params, ids, **kw)
    assert [t.tolist() for t in looked_up] == ([[3, 17, 4095]] * 6 if rows else [])
