"""fitness_shaping=: the shapings' values, the estimate built from them, the default unchanged, the guarantees."""

import pytest
import torch

import zo_kernels
from zo_kernels import distributions
from zo_kernels.shaping import centered_ranks, standardize

METHODS = ["naive", "forward", "antithetic"]


def problem():
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(6, 3, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g)}
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)

    def loss(p, x):
        return ((x @ p["w"]).float() + p["b"]).tanh().square().mean()

    return params, x, loss


def test_centered_ranks_and_standardize_values():
    ranks = centered_ranks(torch.tensor([3.0, -1.0, 3.0, 10.0, 0.5], dtype=torch.float64))
    # sorted: -1 (rank 0), 0.5 (1), 3, 3 (2 and 3: both 2.5), 10 (4); / 4 - 0.5
    assert torch.equal(ranks, torch.tensor([0.125, -0.5, 0.125, 0.5, -0.25], dtype=torch.float64))
    two_by_two = centered_ranks(torch.tensor([[2.0, 1.0], [1.0, 5.0]]))  # float32: ranks rounded once
    torch.testing.assert_close(two_by_two, torch.tensor([[1 / 6, -1 / 3], [-1 / 3, 0.5]]), rtol=0, atol=1e-7)
    assert torch.equal(centered_ranks(torch.tensor([4.0])), torch.zeros(1))
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(z.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(z.square().mean(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(standardize(torch.full((5,), 7.0)), torch.zeros(5))  # std 0: no division by zero


def _shaped_oracle(method, shaping, losses, f0, sigma, num):
    """The weights from the raw losses by hand (losses: (signs, N))."""
    if method == "antithetic":
        s = shaping(losses.reshape(-1)).view_as(losses)
        return (s[0] - s[1]) / (2 * sigma * num)
    diffs = losses[0] - f0 if method == "forward" else losses[0]
    return shaping(diffs) / (sigma * num)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shaping", ["centered_ranks", "standardize", "callable"])
def test_weights_are_the_method_formula_on_the_shaped_losses(method, shaping):
    params, x, loss = problem()
    fn = {"centered_ranks": centered_ranks, "standardize": standardize, "callable": lambda f: f.sign() * 0.3}[shaping]
    opts = dict(method=method, num_samples=7, sigma=0.05, seed=11)
    raw = zo_kernels.estimate(loss, params, x, **opts)
    got = zo_kernels.estimate(loss, params, x, fitness_shaping=fn if shaping == "callable" else shaping, **opts)
    assert torch.equal(got.sample_ids, raw.sample_ids) and got.seed == raw.seed  # the same noise, other weights
    evaluated = _evaluated_losses(loss, params, x, opts)
    want = _shaped_oracle(method, fn, evaluated, loss(params, x).double(), 0.05, 7)
    torch.testing.assert_close(got.weights, want, rtol=1e-12, atol=1e-15)


def _evaluated_losses(loss, params, x, opts):
    """The perturbed losses the estimate sees, recorded by wrapping the loss (first call: f(theta))."""
    seen = []

    def recording(p, x):
        out = loss(p, x)
        seen.append(float(out))
        return out

    zo_kernels.estimate(recording, params, x, **opts)
    values = torch.tensor(seen[1:], dtype=torch.float64)
    if opts["method"] == "antithetic":
        return values.view(-1, 2).t()
    return values[None]


@pytest.mark.parametrize("method", METHODS)
def test_none_is_todays_estimator_bit_for_bit(method):
    params, x, loss = problem()
    tree = [{k: v.clone().requires_grad_() for k, v in params.items()} for _ in range(2)]
    for t, extra in zip(tree, [{}, {"fitness_shaping": None}]):
        zo_kernels.zero_order(distributions.Normal(), method=method, num_samples=5, sigma=0.1, seed=2, **extra)(loss)(
            t, x
        ).backward()
    assert all(torch.equal(tree[0][k].grad, tree[1][k].grad) for k in params)


def test_shaping_is_invariant_to_the_scale_and_shift_of_the_objective():
    params, x, loss = problem()
    opts = dict(method="antithetic", num_samples=9, sigma=0.05, seed=4, fitness_shaping="centered_ranks")
    a = zo_kernels.estimate(loss, params, x, **opts)
    b = zo_kernels.estimate(lambda p, x: 1000.0 * loss(p, x) + 7.0, params, x, **opts)
    assert torch.equal(a.weights, b.weights)


def test_the_decorator_and_the_module_api_take_it():
    params, x, loss = problem()
    tree = {k: v.clone().requires_grad_() for k, v in params.items()}
    fn = zo_kernels.zero_order(distributions.Normal(), method="antithetic", num_samples=6, sigma=0.05, seed=1,
                               fitness_shaping="standardize")(loss)  # fmt: skip
    fn(tree, x).backward()
    sg = zo_kernels.estimate(loss, params, x, method="antithetic", num_samples=6, sigma=0.05, seed=1,
                             fitness_shaping="standardize")  # fmt: skip
    for k, g in zip(params, sg.materialize()):
        torch.testing.assert_close(tree[k].grad, g, rtol=1e-6, atol=1e-9)

    class Net(zo_kernels.nn.ZeroOrderGradientModule, method="antithetic", num_samples=4, sigma=0.1,
              fitness_shaping="centered_ranks"):  # fmt: skip
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x).square().mean()

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    net = Net()
    net(torch.randn(5, 3)).backward()
    assert net.fc.weight.grad is not None and bool(torch.isfinite(net.fc.weight.grad).all())


@pytest.mark.parametrize(
    "value,exc,match",
    [
        ("ranks", ValueError, "'centered_ranks', 'standardize' or a callable"),
        (3, TypeError, "fitness_shaping must be None"),
        (["standardize"], TypeError, "fitness_shaping must be None"),
    ],
)
def test_bad_fitness_shaping_is_refused_before_any_evaluation(value, exc, match):
    params, x, loss = problem()
    calls = []

    def counted(p, x):
        calls.append(1)
        return loss(p, x)

    with pytest.raises(exc, match=match):
        zo_kernels.zero_order(distributions.Normal(), fitness_shaping=value)
    with pytest.raises(exc, match=match):
        zo_kernels.estimate(counted, params, x, fitness_shaping=value)
    with pytest.raises(exc, match=match):

        class Bad(zo_kernels.nn.ZeroOrderGradientModule, fitness_shaping=value):
            pass

    assert not calls


def _raising(f):
    raise RuntimeError("shaping failed")


@pytest.mark.parametrize(
    "shaping,exc,match",
    [
        (_raising, RuntimeError, "shaping failed"),
        (lambda f: f * float("nan"), ValueError, "non-finite"),
        (lambda f: f[..., :-1], ValueError, "shape"),
        (lambda f: (f > 0).long(), TypeError, "floating-point"),
        (lambda f: [0.0] * f.numel(), TypeError, "must return a tensor"),
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_a_failing_shaping_leaves_the_parameters_and_writes_no_grad(shaping, exc, match, inplace):
    params, x, loss = problem()
    params, x = {k: v.float() for k, v in params.items()}, x.float()
    tree = {k: v.clone().requires_grad_() for k, v in params.items()}
    fn = zo_kernels.zero_order(distributions.Normal(), method="antithetic", num_samples=4, sigma=0.1, seed=3,
                               inplace=inplace, fitness_shaping=shaping)(loss)  # fmt: skip
    out = fn(tree, x)
    with pytest.raises(exc, match=match):
        out.backward()
    for k, v in params.items():
        assert tree[k].grad is None
        torch.testing.assert_close(tree[k].detach(), v, rtol=4 * 3 * 2.0**-24, atol=1e-7)  # in place: restored


def test_a_user_distribution_keeps_its_noise_until_the_shaped_weights_are_known():
    """Its noise cannot be regenerated: each sample's is held, then summed with the shaped weights."""
    params, x, loss = problem()
    drawn = []

    def sampler(shape):
        z = torch.randn(shape, generator=gen)
        drawn.append(z)
        return z

    gen = torch.Generator().manual_seed(9)
    tree = {k: v.clone().requires_grad_() for k, v in params.items()}
    seen = []

    def recording(p, x):
        out = loss(p, x)
        seen.append(float(out))
        return out

    fn = zo_kernels.zero_order(sampler, method="naive", num_samples=5, sigma=0.1, fitness_shaping="centered_ranks")
    fn(recording)(tree, x).backward()
    shaped = centered_ranks(torch.tensor(seen[1:], dtype=torch.float64)) / (0.1 * 5)
    leaves = list(tree)  # one draw per sample and per leaf, in leaf order
    for k, name in enumerate(leaves):
        want = sum(float(w) * drawn[i * len(leaves) + k].double() for i, w in enumerate(shaped))
        torch.testing.assert_close(tree[name].grad.double(), want.to(torch.float64), rtol=1e-5, atol=1e-6)
