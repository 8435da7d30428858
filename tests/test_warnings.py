"""Silent failures made loud: an all-zero estimate and ranks that estimate alone get one warning each."""

import pytest
import torch
import torch.distributed as dist

import zo_kernels
from zo_kernels import distributions


def quadratic(t: torch.Tensor) -> torch.Tensor:
    return (t**2).sum()


@pytest.mark.parametrize(
    "make, dtype",
    [
        # sigma far below float32's resolution at |theta| ~ 1: every perturbation rounds away
        (
            lambda: zo_kernels.zero_order(distributions.Normal(), "antithetic", num_samples=4, sigma=1e-12)(quadratic),
            torch.float32,
        ),
        (
            lambda: zo_kernels.zero_order(distributions.Normal(), "forward", num_samples=4, sigma=1e-5)(quadratic),
            torch.float16,
        ),
    ],
    ids=["float32-sigma-1e-12", "float16-sigma-1e-5"],
)
def test_sigma_below_the_dtype_resolution_warns_once(make, dtype):
    f = make()
    theta = torch.ones(8, dtype=dtype, requires_grad=True)
    with pytest.warns(
        RuntimeWarning, match=r"every perturbed loss .* equals .* zero for 'forward' .* sigma=.* resolution"
    ):
        f(theta).backward()
    assert torch.count_nonzero(theta.grad) == 0
    theta.grad = None
    with warnings_as_errors():  # once per decorated function
        f(theta).backward()


def test_a_loss_that_ignores_its_parameters_warns():
    weight = torch.ones(3)

    @zo_kernels.zero_order(distributions.Normal(), method="antithetic", num_samples=4, sigma=0.1)
    def loss(params, x):
        return (x @ weight).sum()  # uses a captured tensor, not the parameters it is given

    params = torch.ones(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"does not use the differentiated argument"):
        loss(params, torch.ones(2, 3)).backward()


def test_an_informative_estimate_does_not_warn():
    theta = torch.ones(8, requires_grad=True)
    with warnings_as_errors():
        zo_kernels.zero_order(distributions.Normal(), num_samples=4, sigma=1e-2)(quadratic)(theta).backward()


def test_ranks_without_a_process_group_are_warned(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    theta = torch.ones(3, requires_grad=True)
    f = zo_kernels.zero_order(distributions.Normal(), num_samples=2, sigma=0.1)(quadratic)
    with pytest.warns(RuntimeWarning, match=r"initialized with 4 ranks, but this estimate was given no process_group"):
        f(theta).backward()
    with warnings_as_errors():
        f(theta).backward()
    with pytest.warns(RuntimeWarning, match=r"no process_group"):
        zo_kernels.estimate(quadratic, theta.detach(), num_samples=2, sigma=0.1)


class warnings_as_errors:
    """Fail if the block warns."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)
