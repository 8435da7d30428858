"""``zero_order``: the TorchOpt-compatible decorator for evolution-strategy gradients."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree

from . import _validate as v
from .estimator import EvaluatorState, Settings, estimate_gradients, make_settings
from .estimator.settings import check_argnums

LossFn = Callable[..., torch.Tensor]


class _CallSite:
    """One call of the wrapped function: rebuilds its arguments around replacement leaves."""

    def __init__(self, fn: LossFn, args: Tuple[Any, ...], kwargs: Dict[str, Any], argnums: Tuple[int, ...]) -> None:
        self.fn, self.args, self.kwargs, self.argnums = fn, args, kwargs, argnums
        self.leaves: List[torch.Tensor] = []
        self.specs: List[Tuple[int, Any, int]] = []
        for argnum in argnums:
            flat, spec = pytree.tree_flatten(args[argnum])
            for k, leaf in enumerate(flat):
                where = (
                    f"argument {argnum}"
                    if len(flat) == 1 and flat[0] is args[argnum]
                    else f"leaf {k} of argument {argnum}"
                )
                self.leaves.append(v.check_leaf(leaf, f"differentiated {where}"))
            self.specs.append((argnum, spec, len(flat)))

    def __call__(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        args = list(self.args)
        start = 0
        for argnum, spec, count in self.specs:
            args[argnum] = _rebuild(args[argnum], leaves[start : start + count], spec)
            start += count
        return self.fn(*args, **self.kwargs)


def _rebuild(original: Any, leaves: Sequence[torch.Tensor], spec: Any) -> Any:
    """``original``'s pytree with ``leaves`` in place of its tensors.

    This runs once per sample, so the common shapes (a tensor, a plain tuple/list/dict of tensors)
    skip the generic ``tree_unflatten``.
    """
    if isinstance(original, torch.Tensor):
        return leaves[0]
    kind = type(original)
    if kind in (tuple, list) and len(original) == len(leaves) and all(isinstance(v, torch.Tensor) for v in original):
        return kind(leaves)
    if kind is dict and len(original) == len(leaves) and all(isinstance(v, torch.Tensor) for v in original.values()):
        return dict(zip(original.keys(), leaves))
    return pytree.tree_unflatten(list(leaves), spec)


class _ZeroOrderFunction(torch.autograd.Function):
    """Forward: f(theta). Backward: the ES estimate, scaled by the upstream gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, settings: Settings, state: EvaluatorState, site: _CallSite, *leaves: torch.Tensor
    ) -> torch.Tensor:
        output = v.check_output(site(leaves), "the function")
        ctx.settings, ctx.state, ctx.site = settings, state, site
        ctx.f0 = output.detach()
        ctx.save_for_backward(*leaves)
        return output

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        leaves = ctx.saved_tensors
        grads = estimate_gradients(ctx.site, leaves, ctx.f0, grad_out, ctx.settings, ctx.state)
        needed = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(grads, needed)))


def zero_order(
    distribution: Any,
    method: str = "naive",
    argnums: Union[int, Tuple[int, ...]] = (0,),
    num_samples: int = 1,
    sigma: float = 1.0,
    *,
    seed: Union[None, int, torch.Generator] = None,
    backend: Optional[str] = None,
    inplace: bool = False,
    process_group: Any = None,
    batch_size: Optional[int] = None,
    fitness_shaping: Any = None,
) -> Callable[[LossFn], LossFn]:
    """Decorate a scalar loss function so that autograd differentiates it by evolution strategies.

    The wrapped function returns its loss ``f(theta)`` unchanged; ``loss.backward()`` (or
    ``torch.autograd.grad``) then yields, for every tensor in the differentiated arguments, the
    zero-order estimate of the gradient of the smoothed objective ``E[f(theta + sigma z)]`` (for
    ``Normal`` noise, the Gaussian-smoothed objective; for other distributions, ``grad f`` up to
    ``O(sigma**2)``), times the upstream gradient:

    - ``'naive'``: ``1/sigma * mean_i f(theta + sigma z_i) z_i``
    - ``'forward'``: ``1/sigma * mean_i (f(theta + sigma z_i) - f(theta)) z_i``
    - ``'antithetic'``: ``1/(2 sigma) * mean_i (f(theta + sigma z_i) - f(theta - sigma z_i)) z_i``

    Args:
        distribution: where ``z`` comes from. ``zo_kernels.distributions.Normal()``,
            ``Rademacher()`` or ``Sphere()`` (and a scalar ``torch.distributions.Normal(0, 1)``)
            use the fused counter-based stream: noise is regenerated inside the kernels and never
            stored. Any other object with ``.sample(sample_shape)``, or a function of the shape,
            is sampled once per sample and per tensor, as in TorchOpt; its samples are cast to each
            parameter's dtype and device, and must have its shape.
        method: ``'naive'``, ``'forward'`` or ``'antithetic'``.
        argnums: index, or tuple of indices, of the positional arguments to differentiate. Each
            may be a tensor or a pytree (nested tuple/list/dict) of floating-point tensors; every
            tensor in them is perturbed, and gradients flow to those that require grad.
        num_samples: number of noise samples ``N`` (``2N`` evaluations for ``'antithetic'``), at most
            ``2**32`` (sample ids are the 32-bit counter word of the noise stream).
        sigma: smoothing scale, a positive finite number.
        seed: ``None`` draws one seed per estimate from torch's default generator, so
            ``torch.manual_seed`` reproduces a run. An ``int`` in ``[0, 2**64)`` fixes the noise:
            every estimate uses the same ``z_i`` (common random numbers, for tests and comparisons;
            not for training). A ``torch.Generator`` draws one seed per estimate from it.
        backend: force a backend by name (see ``zo_kernels.backends.available()``); by default
            the best one for each tensor's device and dtype, or ``$ZO_KERNELS_BACKEND``.
        inplace: MeZO's memory mode (built-in distributions only): perturb the parameters' own
            storage (``+sigma z``, evaluate, ``-sigma z``; antithetic ``+, -2, +``) instead of a
            scratch copy, so the peak memory is that of inference. The parameters are restored
            after every sample, also when the function raises; restoring rounds, so they may move
            by about one float32 rounding per sample (float32/float64 parameters only, contiguous, no
            two sharing memory).
            The function must not keep references to its parameter arguments.
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``; built-in
            distributions only): each rank evaluates its share of the N samples, the ranks
            all-gather the N losses, and every rank builds the same gradient from the shared seed
            (rank 0's). Every rank must call the function with the same parameters. If the
            function raises on one rank while evaluating its share, that rank re-raises it and
            every other rank raises a ``RuntimeError`` naming it, at the same collective, instead
            of waiting; a rank that dies or never reaches the backward pass leaves the others
            waiting until the process group's ``timeout`` (set it in ``init_process_group``).
        batch_size: evaluate ``batch_size`` perturbed parameter sets per call of the function,
            through ``torch.func.vmap`` (built-in distributions only); with 'antithetic' the
            ``+sigma z`` and ``-sigma z`` rows of a sample share a call, so a call holds
            ``max(1, batch_size // 2)`` samples. One kernel call per parameter segment perturbs
            the whole batch. Memory grows with ``batch_size * n`` (one perturbed copy of the
            parameters per batch row, plus, on the CPU backend with normal noise, the batch's
            float32 noise, kept for the gradient instead of regenerated). If the
            function cannot be vmapped (e.g. it calls ``.item()`` or uses data-dependent Python
            control flow: torch raises a ``RuntimeError`` or ``NotImplementedError`` under vmap), a
            ``RuntimeWarning`` says why, once per decorated function, and the samples are evaluated
            one by one from then on, starting with those of the failed batch (so the code the
            function ran before failing under vmap runs once more for them). Any other exception
            the function raises under vmap is its own error: it propagates, naming the batch's samples.
            ``None`` (default): one evaluation per call.
        fitness_shaping: ``None`` (default: the raw losses, TorchOpt's estimators bit for bit),
            ``'centered_ranks'`` (the perturbed losses of the estimate replaced by their ranks mapped
            linearly onto ``[-0.5, 0.5]``, ties sharing their mean rank; Salimans et al. 2017),
            ``'standardize'`` (``(f - mean) / std``; all weights 0 when the std is 0) or a callable
            ``shape(losses) -> Tensor`` of the same shape (checked: shape, floating dtype, finite).
            The shaped set is all N losses ('naive'), the N differences ``f(theta + sigma z_i) -
            f(theta)`` ('forward': the baseline is subtracted before shaping, so with ranks or
            standardization 'forward' equals 'naive'), or all 2N losses ('antithetic'), over every rank
            under ``process_group`` (after the gather). With shaping the result estimates a direction
            along the smoothed gradient rather than the gradient itself (its scale is the shaping's),
            and the chain rule multiplies the shaped estimate by the upstream gradient as usual.

    Returns:
        A decorator. The decorated function takes the same arguments and returns the same scalar.

    Raises:
        ValueError, TypeError: for invalid arguments, at decoration or call time, before the
            function is evaluated.
        zo_kernels.NonFiniteLossError: at backward time, if a perturbed loss is NaN or infinite
            (the message names the sample index and the seed). Gradients are then not written.
    """
    settings = make_settings(
        distribution, method, num_samples, sigma, seed, backend, inplace, process_group, batch_size, fitness_shaping
    )
    return decorate(settings, check_argnums(argnums))


def decorate(settings: Settings, argnums: Tuple[int, ...]) -> Callable[[LossFn], LossFn]:
    """The ``zero_order`` decorator for checked ``settings`` and ``argnums``."""

    def decorator(fn: LossFn) -> LossFn:
        if not callable(fn):
            raise TypeError(f"zero_order decorates a function, got {type(fn).__name__}")
        state = EvaluatorState()  # this function's: whether vmap could run it

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            site = _CallSite(fn, args, kwargs, v.resolve_argnums(argnums, len(args)))
            if settings.inplace:
                v.check_disjoint(site.leaves, "inplace=True perturbs each differentiated tensor's own storage")
            return _ZeroOrderFunction.apply(settings, state, site, *site.leaves)

        return wrapped

    return decorator
