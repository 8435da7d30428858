"""The entry points: ``zero_order`` (the TorchOpt-compatible decorator) and ``estimate`` (a seed-compressed one)."""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._functorch.utils import unwrap_dead_wrappers as unwrap_if_dead
from torch.utils import _pytree as pytree

from . import config as v
from .config import Config, check_argnums, check_regenerable, make_config
from .distributions import FusedDistribution, Normal
from .estimator import EvaluatorState, estimate_gradients, estimate_weights, raise_if_estimate_not_finite
from .estimator.recorded import check_recordable, recorded_gradients
from .noise import Noise
from .ops.spec import accumulation_dtype
from .seed_gradient import SeedGradient

LossFn = Callable[..., torch.Tensor]
#: Set on every function zero_order returns, so that decorating one again is refused.
_DECORATED = "__zo_kernels_zero_order__"


class _CallSite:
    """One call of the wrapped function: its arguments, rebuilt around replacement leaves per evaluation.

    ``leaves`` are the differentiated tensors; ``others`` every other tensor the call received
    (positional and keyword arguments, any pytree depth), with ``names`` for both. The evaluations
    run at backward time with the arguments as they are then, so :meth:`check_unmodified` compares
    every tensor's version counter with the one seen at the call, as autograd does for saved tensors.
    """

    def __init__(self, fn: LossFn, args: Tuple[Any, ...], kwargs: Dict[str, Any], argnums: Tuple[int, ...]) -> None:
        self.fn, self.args, self.kwargs, self.argnums = fn, args, kwargs, argnums
        self.leaves: List[torch.Tensor] = []
        self.specs: List[Tuple[int, int, int, Callable[[Sequence[torch.Tensor]], Any]]] = []
        self.names: List[str] = []
        for argnum in argnums:
            flat, spec = pytree.tree_flatten(args[argnum])
            for k, leaf in enumerate(flat):
                where = _name(f"argument {argnum}", k, flat, args[argnum])
                self.leaves.append(v.check_leaf(leaf, f"differentiated {where}"))
                self.names.append(where)
            start = len(self.leaves) - len(flat)
            self.specs.append((argnum, start, start + len(flat), _rebuilder(args[argnum], spec)))
        self.others: List[torch.Tensor] = []
        for where, value in _other_arguments(args, kwargs, argnums):
            if isinstance(value, torch.Tensor):
                self.others.append(value)
                self.names.append(where)
            elif not isinstance(value, _ATOMS):
                flat = pytree.tree_leaves(value)
                for k, leaf in enumerate(flat):
                    if isinstance(leaf, torch.Tensor):
                        self.others.append(leaf)
                        self.names.append(_name(where, k, flat, value))
        #: The differentiated leaves, then every other tensor of the call (the autograd inputs).
        self.tensors: Tuple[torch.Tensor, ...] = (*self.leaves, *self.others)
        self.versions = [_version(t) for t in self.tensors]

    def __call__(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        args = list(self.args)
        for argnum, start, stop, rebuild in self.specs:
            args[argnum] = rebuild(leaves[start:stop])
        return self.fn(*args, **self.kwargs)

    def check_unmodified(self) -> None:
        """RuntimeError naming the first tensor of the call modified in place since the call (autograd's message)."""
        for name, t, seen in zip(self.names, self.tensors, self.versions):
            now = _version(t)
            if seen is not None and now != seen:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace operation: "
                    f"{name} of the zero_order function (a {list(t.shape)} {t.dtype} tensor) is at version {now}; "
                    f"expected version {seen} instead. zo_kernels evaluates the function at backward time with its "
                    "arguments as they are then: pass a copy (x.clone()), or call backward before modifying it."
                )

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> _CallSite:
        """The same call with :attr:`tensors` replaced, in order (one element of a vmapped batch)."""
        replace = {id(old): new for old, new in zip(self.tensors, tensors)}

        def swap(value: Any) -> Any:
            return replace.get(id(value), value) if isinstance(value, torch.Tensor) else value

        args, kwargs = pytree.tree_map(swap, (list(self.args), self.kwargs))
        return _CallSite(self.fn, tuple(args), kwargs, self.argnums)


#: Arguments that hold no tensor: not flattened when looking for tensors to version-check.
_ATOMS = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)


def _name(where: str, k: int, flat: Sequence[Any], value: Any) -> str:
    """How errors name leaf ``k`` of the argument ``where`` (the argument itself when it is one tensor)."""
    return where if len(flat) == 1 and flat[0] is value else f"leaf {k} of {where}"


def _other_arguments(args: Tuple[Any, ...], kwargs: Dict[str, Any], argnums: Tuple[int, ...]) -> List[Tuple[str, Any]]:
    """The arguments that are not differentiated, with how errors name them."""
    named = [(f"argument {k}", a) for k, a in enumerate(args) if k not in argnums]
    return named + [(f"keyword argument {key!r}", a) for key, a in kwargs.items()]


#: autograd's ``is_grads_batched`` vmaps with the legacy batching (older torch builds may lack the probe).
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmapped batch (torch.func's or autograd's ``is_grads_batched``), not plain data."""
    return is_functorch_wrapped_tensor(t) or _is_legacy_batched(t)


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter, or None where it has none (inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _rebuilder(original: Any, spec: Any) -> Callable[[Sequence[torch.Tensor]], Any]:
    """A function of replacement leaves that rebuilds ``original``'s pytree around them.

    It runs once per evaluation, so the common shapes (a tensor, a plain tuple/list/dict of tensors)
    are decided once, here, and skip the generic ``tree_unflatten``.
    """
    if isinstance(original, torch.Tensor):
        return operator.itemgetter(0)
    kind = type(original)
    if kind in (tuple, list) and all(isinstance(v, torch.Tensor) for v in original):
        return kind
    if kind is dict and all(isinstance(v, torch.Tensor) for v in original.values()):
        keys = tuple(original.keys())
        return lambda leaves: dict(zip(keys, leaves))
    return lambda leaves: pytree.tree_unflatten(list(leaves), spec)


class _ZeroOrderFunction(torch.autograd.Function):
    """Forward: f(theta). Backward: the ES estimate, scaled by the upstream gradient.

    Every tensor of the call is an input (the differentiated leaves first), so that autograd and
    ``torch.func.vmap`` see all of them; only the leaves get gradients.
    """

    @classmethod
    def apply(cls, *args: Any) -> torch.Tensor:  # type: ignore[override]
        """``Function.apply`` without its per-call ``inspect.signature`` (forward has no defaults to bind).

        That binding was most of the decorator's own cost per call; under a torch.func transform
        the call goes through ``Function.apply`` unchanged.
        """
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_if_dead(args))  # type: ignore[misc]

    @staticmethod
    def forward(config: Config, state: EvaluatorState, site: _CallSite, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return v.check_output(site(tensors[: len(site.leaves)]), "the function")

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:  # noqa: D102
        config, state, site = inputs[:3]
        ctx.config, ctx.state, ctx.site = config, state, site
        ctx.f0 = output.detach()
        ctx.save_for_backward(*inputs[3 : 3 + len(site.leaves)])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        site = ctx.site
        needed = ctx.needs_input_grad[3 : 3 + len(site.leaves)]
        nothing = (None,) * (3 + len(site.tensors))
        if not any(needed):
            return nothing
        site.check_unmodified()
        leaves = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True, or a torch.func transform (which always records)
            why = "torch.func" if is_functorch_wrapped_tensor(grad_out) else "create_graph=True"
            grads = recorded_gradients(site, leaves, ctx.f0, ctx.config, ctx.state, why)
            grads = [g * grad_out for g in grads]
        elif _is_batched(grad_out):  # is_grads_batched=True: the estimate once, times each upstream gradient
            unit = torch.ones((), dtype=ctx.f0.dtype, device=ctx.f0.device)
            grads = [g * grad_out for g in estimate_gradients(site, leaves, ctx.f0, unit, ctx.config, ctx.state)]
        else:
            # on_use serves the very tensor objects the function is given, which are the call's own
            # (saved tensors may come back as other objects)
            given = site.leaves if ctx.config.on_use else leaves
            grads = estimate_gradients(site, given, ctx.f0, grad_out, ctx.config, ctx.state)
        return (None, None, None, *(g if need else None for g, need in zip(grads, needed)), *nothing[3 + len(grads) :])

    @staticmethod
    def vmap(
        info: Any,
        in_dims: Tuple[Any, ...],
        config: Config,
        state: EvaluatorState,
        site: _CallSite,
        *tensors: torch.Tensor,
    ) -> Tuple[torch.Tensor, int]:  # type: ignore[override]
        """``torch.func.vmap``: one zero_order call per element of the batch (each its own estimate)."""
        dims = in_dims[3:]
        outputs = []
        for b in range(info.batch_size):
            sliced = [t if d is None else t.select(d, b) for t, d in zip(tensors, dims)]
            outputs.append(_ZeroOrderFunction.apply(config, state, site.with_tensors(sliced), *sliced))
        return torch.stack(outputs), 0

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> torch.Tensor:  # noqa: D102
        raise RuntimeError(
            "zo_kernels.zero_order has no forward-mode derivative (torch.func.jvp, jacfwd, torch.func.hessian, "
            "torch.autograd.forward_ad): differentiate it in reverse mode, e.g. "
            "torch.func.jacrev(torch.func.jacrev(f)) or torch.autograd.functional.hessian(f, x) for a Hessian"
        )


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
    perturb: str = "copy",
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

    The perturbed evaluations run at backward time, with the arguments as they are then: a tensor of
    the call modified in place before ``backward()`` raises autograd's "modified by an inplace
    operation" ``RuntimeError`` naming it. Under ``create_graph=True`` (and ``torch.func.grad`` /
    ``jacrev``, which always record) the evaluations are recorded by autograd, so the estimate is a
    differentiable function of the parameters (for 'antithetic' its derivative is the Stein
    second-order estimate); ``torch.func.vmap`` runs one call per batch element. Forward-mode AD is
    refused (docs/meta_learning.md).

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
        inplace: ``inplace=True`` is the alias of ``perturb='inplace'``.
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
        perturb: how each evaluation sees ``theta + s sigma z_i`` (docs/memory.md):

            - ``'copy'`` (default): written into a scratch copy of the parameters, which the
              function receives (one extra copy of the parameters).
            - ``'inplace'`` (MeZO's mode; built-in distributions): written into the parameters'
              own storage (``+sigma z``, evaluate, ``-sigma z``; antithetic ``+, -2, +``) and
              restored after every sample, also when the function raises. Restoring rounds, so the
              parameters may move by about one float32 rounding per sample: float32/float64
              parameters only, contiguous, no two sharing memory; the function must not keep
              references to its parameter arguments.
            - ``'on_use'`` (built-in distributions): the function receives the parameters
              themselves, and every torch operation that reads one of them during an evaluation is
              served its perturbed values (generated by the fused kernel into a transient released
              when the operation returns; for ``LowRank`` matrices, ``F.linear``/matmul/``addmm``/
              ``F.embedding`` as the shared product plus the low-rank term). The parameters are
              never written, so it is exact for every dtype, at inference memory, and equals
              ``'copy'`` for the same seed. A parameter read where torch operations do not see it
              (a C++ extension given its data pointer, a program compiled ahead of time) is evaluated
              unperturbed: a parameter that no operation read during an evaluation is named in a
              ``RuntimeWarning`` (``torch.compile``'d modules are served). Not with
              ``create_graph=True``/``torch.func``, nor with ``batch_size`` unless the distribution is
              ``LowRank``.

    Returns:
        A decorator. The decorated function takes the same arguments and returns the same scalar.

    Raises:
        ValueError, TypeError: for invalid arguments, at decoration or call time, before the
            function is evaluated.
        zo_kernels.NonFiniteLossError: at backward time, if a perturbed loss is NaN or infinite
            (the message names the sample index and the seed). Gradients are then not written.
    """
    mode = v.check_perturb(perturb, inplace)
    config = make_config(
        distribution, method, num_samples, sigma, seed, backend, mode, process_group, batch_size, fitness_shaping
    )
    return decorate(config, check_argnums(argnums))


def decorate(config: Config, argnums: Tuple[int, ...]) -> Callable[[LossFn], LossFn]:
    """The ``zero_order`` decorator for checked ``config`` and ``argnums``."""

    def decorator(fn: LossFn) -> LossFn:
        if not callable(fn):
            raise TypeError(f"zero_order decorates a function, got {type(fn).__name__}")
        if getattr(fn, _DECORATED, False):
            raise TypeError(
                "zero_order: this function is already decorated by zo_kernels.zero_order; decorating it again "
                "would estimate the gradient of a gradient estimate (and drop the first decorator's batch_size). "
                "Decorate the plain function (the decorated one's __wrapped__) once, with all the options."
            )
        state = EvaluatorState()  # this function's: whether vmap could run it

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            site = _CallSite(fn, args, kwargs, v.resolve_argnums(argnums, len(args)))
            if config.perturb != "copy" and any(is_functorch_wrapped_tensor(t) for t in site.leaves):
                check_recordable(config, "torch.func")  # a transform's tensors have no storage to perturb
            if config.inplace:
                v.check_disjoint(site.leaves, "inplace=True perturbs each differentiated tensor's own storage")
            elif config.on_use:
                v.check_distinct(site.leaves, "perturb='on_use' serves each differentiated tensor by its identity")
            return _ZeroOrderFunction.apply(config, state, site, *site.tensors)

        setattr(wrapped, _DECORATED, True)
        return wrapped

    return decorator


@torch.no_grad()
def estimate(
    fn: Any,
    params: Any,
    *args: Any,
    distribution: Optional[FusedDistribution] = None,
    method: str = "naive",
    num_samples: int = 1,
    sigma: float = 1.0,
    seed: Union[None, int, torch.Generator] = None,
    backend: Optional[str] = None,
    inplace: bool = False,
    process_group: Any = None,
    batch_size: Optional[int] = None,
    fitness_shaping: Any = None,
    perturb: str = "copy",
    **kwargs: Any,
) -> SeedGradient:
    """Estimate the gradient of ``fn(params, *args, **kwargs)`` and return it seed-compressed.

    The same estimator as :func:`zo_kernels.zero_order` (same methods, same noise for the same
    seed, so ``estimate(...).materialize()`` equals the gradient ``zero_order`` would write), but
    without autograd: the result is ``(seed, N weights)``, never an n-element tensor.

    Args:
        fn: the loss, ``fn(params, *args, **kwargs) -> scalar tensor``.
        params: a tensor, a pytree (dict, list, tuple, nested) of floating-point tensors, or any
            other iterable of them such as ``model.parameters()`` or ``dict.values()``. Such an
            iterable is read once into a list, and ``fn`` receives that list.
        *args: further positional arguments of ``fn``, passed through.
        distribution: a built-in fused distribution (default ``Normal()``); a scalar
            ``torch.distributions.Normal(0, 1)`` is accepted too.
        method: ``'naive'``, ``'forward'`` or ``'antithetic'``, as for :func:`zo_kernels.zero_order`.
        num_samples: number of noise samples N.
        sigma: smoothing scale.
        seed: ``None`` (one draw from torch's generator), an int, or a ``torch.Generator``.
        backend: force a backend by name.
        inplace: the alias ``inplace=True`` of ``perturb='inplace'``.
        process_group: spread the samples over a ``torch.distributed`` group (see
            :func:`zo_kernels.zero_order`); every rank returns the same SeedGradient.
        batch_size: evaluate that many perturbed parameter sets per vmapped call (see
            :func:`zo_kernels.zero_order`).
        fitness_shaping: ``None``, ``'centered_ranks'``, ``'standardize'`` or a callable, as for
            :func:`zo_kernels.zero_order`; the weights are then the shaped ones.
        perturb: ``'copy'``, ``'inplace'`` or ``'on_use'`` (see :func:`zo_kernels.zero_order`);
            with ``'on_use'`` a function that ignores ``params`` and calls a module holding them
            (``lambda ps: model(x)``) is perturbed too, since the uses of the tensors themselves are served.
        **kwargs: keyword arguments of ``fn``, passed through.

    Returns:
        The :class:`SeedGradient`; its ``loss`` is the unperturbed ``fn(params, ...)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a function (the loss), got {type(fn).__name__}")
    for k, arg in enumerate(args):
        if isinstance(arg, Noise):
            raise TypeError(
                f"estimate: positional argument {k + 3} is the distribution {arg!r}, which would be passed to fn as "
                "data; pass it by keyword: estimate(fn, params, ..., distribution=...)"
            )
    noise = check_regenerable(distribution if distribution is not None else Normal())
    mode = v.check_perturb(perturb, inplace)
    config = make_config(
        noise, method, num_samples, sigma, seed, backend, mode, process_group, batch_size, fitness_shaping
    )
    leaves, spec = pytree.tree_flatten(v.as_params(params))
    for k, leaf in enumerate(leaves):
        v.check_leaf(leaf, f"leaf {k} of params")
    if config.inplace:
        v.check_disjoint(leaves, "inplace=True perturbs each tensor of params in its own storage")
    elif config.on_use:
        v.check_distinct(leaves, "perturb='on_use' serves each tensor of params by its identity")

    def evaluate(tensors: Any) -> torch.Tensor:
        return fn(pytree.tree_unflatten(list(tensors), spec), *args, **kwargs)

    f0 = v.check_output(evaluate([p.detach() for p in leaves]), "fn").detach()
    done, weights = estimate_weights(evaluate, leaves, f0, config, EvaluatorState())
    weights = weights.cpu()
    # The weights are float64; the parameters' accumulation dtype must hold them too.
    dtypes = {accumulation_dtype(p.dtype) for p in leaves}
    raise_if_estimate_not_finite([weights.to(dtype) for dtype in dtypes], config.sigma)
    return SeedGradient(
        seed=done.seed,
        sample_ids=done.sample_ids.cpu(),
        weights=weights,
        sigma=config.sigma,
        stream=config.noise.stream,
        shapes=[p.shape for p in leaves],
        dtypes=[p.dtype for p in leaves],
        loss=float(f0),
        rank=getattr(config.noise, "rank", None),
    )
