"""ZeroOrderGradientModule: TorchOpt's module API and errors."""

import pytest
import torch
from torch import nn

import zo_kernels
from zo_kernels.nn import ZeroOrderGradientModule

pytestmark = pytest.mark.usefixtures("each_cpu_backend")


def make_linear_problem(n=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return x, x @ w + 0.1


@pytest.mark.parametrize("method", ["naive", "forward", "antithetic"])
def test_module_trains_a_linear_model(method):
    x, y = make_linear_problem()

    class Net(ZeroOrderGradientModule, method=method, num_samples=32, sigma=0.1):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 1)

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.fc(x), y)

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.02 if method == "naive" else 0.05)
    losses = []
    for _ in range(60):
        loss = net(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in net.parameters())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_module_with_tied_parameters_keeps_them_tied():
    class Tied(ZeroOrderGradientModule, num_samples=4, sigma=0.1):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            assert self.a.weight is self.b.weight
            return self.b(self.a(x)).sum()

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    net = Tied()
    weight = net.a.weight
    net(torch.ones(2, 3)).backward()
    assert net.a.weight is weight and net.b.weight is weight and weight.grad is not None


def test_module_parameters_restored_when_forward_raises():
    class Boom(ZeroOrderGradientModule, num_samples=3):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.calls = 0

        def forward(self):
            self.calls += 1
            if self.calls == 2:
                raise ValueError("inside forward")
            return self.w.sum()

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    net = Boom()
    w = net.w
    loss = net()
    with pytest.raises(ValueError, match="inside forward"):
        loss.backward()
    assert net.w is w and w.grad is None and torch.equal(w.detach(), torch.ones(2))


def test_module_without_parameters():
    class Empty(ZeroOrderGradientModule):
        def forward(self):
            return torch.tensor(0.0)

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    with pytest.raises(RuntimeError, match="The module has no parameters."):
        Empty()()


def test_enabling_twice_is_a_type_error():
    class Once(ZeroOrderGradientModule):
        def forward(self):
            return torch.tensor(0.0)

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    with pytest.raises(TypeError, match="already enabled"):

        class Twice(Once):
            pass

    with pytest.raises(TypeError, match="already enabled"):
        zo_kernels.nn.enable_zero_order_gradients(Once)


def test_abstract_methods_are_a_type_error():
    class NoSample(ZeroOrderGradientModule):
        def forward(self):
            return torch.tensor(0.0)

    class NoForward(ZeroOrderGradientModule):
        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    for cls in (NoSample, NoForward):
        with pytest.raises(TypeError, match="abstract"):
            cls()


def test_invalid_class_keywords_fail_at_class_creation():
    with pytest.raises(ValueError, match="method"):

        class Bad(ZeroOrderGradientModule, method="sideways"):
            def forward(self):
                return torch.tensor(0.0)

            def sample(self, sample_shape=torch.Size()):
                return torch.randn(sample_shape)


def test_importable_from_the_top_level():
    assert zo_kernels.ZeroOrderGradientModule is ZeroOrderGradientModule


def test_frozen_parameters_are_neither_perturbed_nor_estimated():
    """Only the parameters that require grad are perturbed (TorchOpt perturbs every parameter)."""
    seen = []

    class Net(ZeroOrderGradientModule, method="antithetic", num_samples=4, sigma=0.1):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)
            self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
            self.steps = nn.Parameter(torch.zeros((), dtype=torch.int64), requires_grad=False)

        def forward(self, x):
            seen.append(self.frozen.detach().clone())
            return (self.fc(x * self.frozen) ** 2).mean()

        def sample(self, sample_shape=torch.Size()):
            return torch.randn(sample_shape)

    net = Net()
    net(torch.randn(8, 3)).backward()
    assert len(seen) == 1 + 2 * 4 and all(torch.equal(s, torch.ones(3)) for s in seen)
    assert net.frozen.grad is None and net.fc.weight.grad is not None
