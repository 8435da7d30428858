"""LowRank(rank): the noise layout of docs/reference.md, every estimator path against a plain oracle, the guarantees."""

import math
import warnings

import pytest
import torch

import zo_kernels
from zo_kernels import backends, distributions
from zo_kernels.noise.lowrank import FACTOR_BASE
from zo_kernels.ops import reference

BACKENDS = [name for name in ("reference", "cpu", "triton") if backends.available()[name] == "available"]


def oracle_noise(leaves, rank, seed, i):
    """Sample ``i`` of LowRank(rank) for each leaf, straight from the documented layout (reference stream)."""
    out, offset = [], 0
    for p in leaves:
        ids = torch.tensor([i])
        if p.dim() >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            z = reference.noise("normal", seed, ids, FACTOR_BASE + 2 * rank * offset, rank * (m + n))[0].double()
            a, b = z[: m * rank].view(m, rank), z[m * rank :].view(n, rank)
            out.append((a @ b.t() / math.sqrt(rank)).view(p.shape))
        else:
            out.append(reference.noise("normal", seed, ids, offset, p.numel())[0].double().view(p.shape))
        offset += p.numel()
    return out


def oracle_gradient(f, leaves, rank, seed, method, num, sigma):
    """TorchOpt's three estimators, one materialized sample at a time, in float64."""
    base = [p.double() for p in leaves]
    f0 = f(base)
    grads = [torch.zeros_like(p) for p in base]
    for i in range(num):
        z = oracle_noise(leaves, rank, seed, i)
        plus = f([p + sigma * e for p, e in zip(base, z)])
        if method == "antithetic":
            w = (plus - f([p - sigma * e for p, e in zip(base, z)])) / (2 * sigma * num)
        else:
            w = ((plus - f0) if method == "forward" else plus) / (sigma * num)
        for g, e in zip(grads, z):
            g.add_(w * e)
    return grads


def problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(12, 9, generator=g, dtype=dtype)
    conv = torch.randn(4, 3, 2, 2, generator=g, dtype=dtype)  # ndim 4: a (4, 12) matrix
    b1 = torch.randn(12, generator=g, dtype=dtype)
    x = torch.randn(6, 9, generator=g, dtype=dtype)

    def f(p):
        h = torch.tanh(x.to(p[0].dtype) @ p[0].t() + p[2])
        return h.square().mean() + p[1].sin().sum() * 0.1

    return f, [w1, conv, b1]


# -- the distribution --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError), ("2", TypeError)]
)
def test_bad_rank_is_refused(rank, exc):
    with pytest.raises(exc, match="rank must be an int >= 1"):
        distributions.LowRank(rank)


def test_sample_is_the_documented_layout_and_has_identity_covariance():
    d = distributions.LowRank(3)
    got = d.sample((40, 50), seed=9)
    want = oracle_noise([torch.empty(40, 50)], 3, 9, 0)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert d.sample(7, seed=9).shape == (7,) and repr(d) == "LowRank(rank=3)" and d == distributions.LowRank(3)
    # moments over many samples: unit variance, uncorrelated entries (two entries sharing a row)
    z = torch.stack([oracle_noise([torch.empty(6, 5)], 3, 1, i)[0].reshape(-1) for i in range(3000)])
    assert abs(float(z.var()) - 1.0) < 0.08
    assert abs(float((z[:, 0] * z[:, 1]).mean())) < 0.08 and abs(float(z.mean())) < 0.05


# -- every estimator path against the oracle -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
@pytest.mark.parametrize("path", ["loop", "inplace", "estimate"])
def test_gradient_matches_the_materialized_oracle(backend, method, path):
    f, leaves = problem()
    rank, seed, num, sigma = 2, 21, 6, 0.05
    want = oracle_gradient(f, leaves, rank, seed, method, num, sigma)
    opts = dict(method=method, num_samples=num, sigma=sigma, seed=seed, backend=backend)
    if path == "estimate":
        got = zo_kernels.estimate(f, [p.clone() for p in leaves], distribution=distributions.LowRank(rank), **opts)
        got = got.materialize()
    else:
        params = [p.clone().requires_grad_() for p in leaves]
        fn = zo_kernels.zero_order(distributions.LowRank(rank), inplace=path == "inplace", **opts)(f)
        fn(params).backward()
        got = [p.grad for p in params]
        for p, q in zip(params, leaves):
            torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)  # restored after in-place
    # the reference stream is the oracle's bit for bit; the compiled ones agree to float32 rounding
    # (materialize regenerates the noise on the default backend of the CPU)
    tol = 1e-9 if backend == "reference" and path != "estimate" else 2e-4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_dtypes(dtype):
    f, leaves = problem(dtype)
    opts = dict(method="antithetic", num_samples=4, sigma=0.1, seed=3)
    got = zo_kernels.estimate(f, leaves, distribution=distributions.LowRank(1), **opts).materialize()
    want = oracle_gradient(lambda p: f([t.to(dtype) for t in p]).double(), leaves, 1, 3, "antithetic", 4, 0.1)
    tol = 2e-3 if dtype == torch.float32 else 0.15
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * float(w.abs().max()))


def test_seed_gradient_round_trip_and_fused_step():
    f, leaves = problem()
    sg = zo_kernels.estimate(f, leaves, distribution=distributions.LowRank(2), num_samples=5, sigma=0.1, seed=4)
    assert sg.rank == 2
    again = zo_kernels.SeedGradient.from_state_dict(sg.state_dict())
    assert again.rank == 2
    for a, b in zip(sg.materialize(), again.materialize()):
        assert torch.equal(a, b)
    params = [p.clone() for p in leaves]
    sg.apply_(params, 0.5)
    for p, q, g in zip(params, leaves, sg.materialize()):
        torch.testing.assert_close(p, q - 0.5 * g, rtol=1e-12, atol=1e-12)  # the step never writes g, same sum
    with pytest.raises(ValueError, match=r"state\['rank'\]"):
        zo_kernels.SeedGradient.from_state_dict({**sg.state_dict(), "rank": 0})


def test_optimizers_step_with_lowrank():
    f, leaves = problem()
    params = [p.clone().requires_grad_() for p in leaves]
    opt = zo_kernels.optim.ZOAdam(params, lr=0.01)
    before = f(params).item()
    for step in range(30):
        sg = zo_kernels.estimate(f, params, distribution=distributions.LowRank(1), method="antithetic",
                                 num_samples=8, sigma=0.05, seed=step)  # fmt: skip
        opt.step(sg)
    assert f(params).item() < before


def test_nan_loss_is_refused_and_parameters_are_untouched():
    f, leaves = problem()
    params = [p.clone().requires_grad_() for p in leaves]
    calls = []

    def bad(p):
        calls.append(1)
        return f(p) * (float("nan") if len(calls) == 3 else 1.0)

    fn = zo_kernels.zero_order(distributions.LowRank(2), num_samples=4, sigma=0.1, seed=1, inplace=True)(bad)
    with pytest.raises(zo_kernels.NonFiniteLossError, match="sample"):
        fn(params).backward()
    for p, q in zip(params, leaves):  # restored (to rounding: +sigma z, then -sigma z) and no .grad written
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)
        assert p.grad is None


# -- population evaluation: the weights shared under vmap ----------------------------------------------


def _mlp_problem():
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(10, 16, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g, dtype=torch.float64)

    def f(p):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    return f, params


@pytest.mark.parametrize("method", ["naive", "antithetic"])
def test_batched_population_equals_the_loop(method):
    pytest.importorskip("zo_kernels.noise.shared_weights")
    f, params = _mlp_problem()
    opts = dict(distribution=distributions.LowRank(2), method=method, num_samples=9, sigma=0.05, seed=8)
    loop = zo_kernels.estimate(f, params, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # F.linear only: nothing is materialized, nothing warns
        batched = zo_kernels.estimate(f, params, batch_size=6, **opts)
    torch.testing.assert_close(batched.weights, loop.weights, rtol=1e-9, atol=1e-12)


def test_batched_members_receive_the_shared_weights():
    """Under batch_size, a matrix reaches the function as the unperturbed tensor itself (no copy per member)."""
    pytest.importorskip("zo_kernels.noise.shared_weights")
    f, params = _mlp_problem()
    seen = []

    def spy(p):
        seen.append(p["0.weight"].data_ptr())
        return f(p)

    zo_kernels.estimate(spy, params, distribution=distributions.LowRank(1), num_samples=4, sigma=0.1, seed=1,
                        batch_size=4)  # fmt: skip
    assert seen[-1] == params["0.weight"].data_ptr()


def test_an_unsupported_use_is_exact_and_warns_once():
    rewrite = pytest.importorskip("zo_kernels.noise.shared_weights")
    f, params = _mlp_problem()

    def penalized(p):
        return f(p) + 0.01 * p["2.weight"].pow(2).sum()

    opts = dict(distribution=distributions.LowRank(2), method="antithetic", num_samples=6, sigma=0.05, seed=8)
    loop = zo_kernels.estimate(penalized, params, **opts)
    rewrite.reset_warnings()
    with pytest.warns(UserWarning, match="pow") as record:
        batched = zo_kernels.estimate(penalized, params, batch_size=4, **opts)
    assert sum("pow" in str(w.message) for w in record) == 1
    torch.testing.assert_close(batched.weights, loop.weights, rtol=1e-9, atol=1e-12)


def test_an_exception_inside_a_member_propagates_and_leaves_nothing_behind():
    pytest.importorskip("zo_kernels.noise.shared_weights")
    f, params = _mlp_problem()
    before = {k: v.clone() for k, v in params.items()}

    def failing(p):
        raise KeyError("no such layer")

    with pytest.raises(KeyError, match="no such layer"):
        zo_kernels.estimate(failing, params, distribution=distributions.LowRank(1), num_samples=4, batch_size=4)
    assert not torch.overrides._get_current_function_mode_stack()
    assert all(torch.equal(params[k], before[k]) for k in params)
