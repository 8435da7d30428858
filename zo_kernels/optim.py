"""Zero-order optimizers that step from a :class:`~zo_kernels.seed_gradient.SeedGradient`.

``ZOSGD`` without momentum keeps no state at all: each step is the fused ``step`` kernel
``theta -= lr * sum_i w_i z_i``, so training needs the memory of inference plus N scalars (MeZO's
footprint). Momentum and Adam need per-parameter state, as their first-order versions do, and
materialize the gradient once per step.

Both are ``torch.optim.Optimizer`` subclasses: ``param_groups`` (each group with its own ``lr`` and
other options), ``add_param_group``, ``state_dict()`` / ``load_state_dict()`` in torch's format (so
``torch.save`` and checkpointing work), ``zero_grad()`` and the ``torch.optim.lr_scheduler``
schedulers. One difference: ``step`` takes the estimate, ``opt.step(sg)``, not a closure, and never
reads ``.grad``. The ``SeedGradient`` covers the parameters of every group, concatenated in group
order: estimate with ``[p for g in opt.param_groups for p in g["params"]]``, or the same tensors in
the same order.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

from .config import as_params, check_leaf, check_real
from .ops.spec import accumulation_dtype
from .seed_gradient import SeedGradient, _state_int


def _leaves(params: Any, first: int = 0) -> List[torch.Tensor]:
    """The tensors of ``params`` (a tensor, a pytree or any iterable of tensors), numbered from ``first``."""
    leaves = pytree.tree_leaves(as_params(params))
    for k, p in enumerate(leaves, first):
        # Meta tensors are accepted, for deferred initialization: a step on them changes nothing.
        if not (isinstance(p, torch.Tensor) and p.device.type == "meta" and p.dtype.is_floating_point):
            check_leaf(p, f"params leaf {k}")
    return leaves


def _param_groups(params: Any) -> List[Dict[str, Any]]:
    """``params`` as torch's list of param groups, every tensor checked (numbered across the groups)."""
    params = as_params(params)
    is_groups = isinstance(params, (list, tuple)) and params and isinstance(params[0], Mapping)
    if is_groups and "params" in params[0]:
        groups = [_group_dict(g) for g in params]
    else:
        groups = [{"params": params}]
    count = 0
    for group in groups:
        group["params"] = _leaves(group["params"], count)
        count += len(group["params"])
    if not count:
        raise ValueError("params must hold at least one tensor")
    return groups


def _group_dict(group: Any) -> Dict[str, Any]:
    if not isinstance(group, Mapping) or "params" not in group:
        raise TypeError(f"a param group must be a dict with a 'params' entry (as for torch.optim), got {group!r:.80}")
    return dict(group)


def _check_lr(lr: Any, label: str = "lr") -> float:
    return check_real(lr, label, lo=0.0)


def _check_betas(betas: Any, label: str = "betas") -> Tuple[float, float]:
    message = f"{label} must be two numbers in [0, 1), got {betas!r}"
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(message)
    try:
        b1, b2 = (check_real(b, label, lo=0.0, hi=1.0) for b in betas)
    except (TypeError, ValueError) as exc:
        raise type(exc)(message) from None
    return b1, b2


def _check_eps(eps: Any, label: str = "eps") -> float:
    value = check_real(eps, label, lo=0.0)
    if value == 0.0:
        raise ValueError(f"{label} must be a finite real number > 0, got {eps!r}")
    return value


class _ZOOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """What ZOSGD and ZOAdam share: param groups of checked tensors, the estimate's checks, checked state loading."""

    #: The options of a param group, in the order ``_options`` returns them.
    _OPTIONS: Tuple[str, ...] = ()

    @abc.abstractmethod
    def _options(self, group: Mapping, where: str) -> Tuple[Any, ...]:
        """The group's options, checked, in :attr:`_OPTIONS` order (errors name ``where``)."""

    @abc.abstractmethod
    def _check_state(self, entry: Any, p: torch.Tensor, where: str) -> Dict[str, Any]:
        """One parameter's loaded state ``entry``, checked against ``p`` (errors name ``where``)."""

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group ``{'params': tensors, 'lr': ..., ...}``; the options it leaves out take the defaults.

        Its parameters come after those of the earlier groups in the ``SeedGradient`` that ``step`` takes.
        """
        group = _group_dict(param_group)
        group["params"] = _leaves(group["params"], sum(len(g["params"]) for g in self.param_groups))
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        group.update(zip(self._OPTIONS, self._options(group, f"param_groups[{len(self.param_groups)}]")))
        super().add_param_group(group)

    def _prepare(self, grad: Any) -> Tuple[SeedGradient, List[Tuple[torch.Tensor, int, Tuple[Any, ...]]]]:
        """Check everything a step needs: each parameter with its flat offset in ``grad`` and its group's options."""
        caller = f"{type(self).__name__}.step"
        if not isinstance(grad, SeedGradient):
            got = "nothing" if grad is None else type(grad).__name__
            raise TypeError(
                f"{caller} needs a SeedGradient (from zo_kernels.estimate), got {got}: call "
                f"opt.step(zo_kernels.estimate(fn, params, ...)); it steps from that estimate, not from .grad, "
                "and takes no closure"
            )
        work, leaves = [], []
        for i, group in enumerate(self.param_groups):
            options = self._options(group, f"param_groups[{i}]")
            leaves += group["params"]
            work += [(p, options) for p in group["params"]]
        grad._check_params(leaves, caller)
        return grad, [(p, offset, options) for (p, options), offset in zip(work, grad._offsets())]

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (torch's format), checked before anything changes.

        Each group's options and each parameter's state (names, shapes) are checked, naming the entry;
        the state tensors are copied to their parameter's device.
        """
        checked = self._check_state_dict(state_dict)
        super().load_state_dict(checked)
        # torch casts each floating-point state tensor to its parameter's dtype, but ZOAdam keeps float32 moments for
        # half-precision parameters: the checked copies replace torch's.
        ids = [i for g in checked["param_groups"] for i in g["params"]]
        for i, p in zip(ids, (p for g in self.param_groups for p in g["params"])):
            if i in checked["state"]:
                self.state[p] = checked["state"][i]

    def _check_state_dict(self, state_dict: Any) -> Dict[str, Any]:
        """A copy of ``state_dict`` with checked options and the state tensors copied, or an error naming the entry."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError(
                f"state_dict must be a dict with 'state' and 'param_groups' (from {type(self).__name__}.state_dict()), "
                f"got {type(state_dict).__name__}"
            )
        saved, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.param_groups):
            count = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
            raise ValueError(
                f"state_dict['param_groups'] must have one entry per group ({len(self.param_groups)}), got {count}"
            )
        groups, params = [], {}
        for i, (group, entry) in enumerate(zip(self.param_groups, saved)):
            where = f"state_dict['param_groups'][{i}]"
            entry = _group_dict(entry)
            ids = list(entry["params"])
            if len(ids) != len(group["params"]):
                raise ValueError(f"{where}['params'] must list {len(group['params'])} parameters, got {len(ids)}")
            entry.update(zip(self._OPTIONS, self._options(entry, where)), params=ids)
            groups.append(entry)
            params.update(zip(ids, group["params"]))
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
        checked = {}
        for key, entry in state.items():
            if key not in params:
                raise ValueError(f"state_dict['state'] has an entry for parameter {key!r}, which no param group lists")
            entry = self._check_state(entry, params[key], f"state_dict['state'][{key!r}]")
            if entry:
                checked[key] = entry
        return {**state_dict, "param_groups": groups, "state": checked}


def _state_tensor(entry: Mapping, key: str, p: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """``entry[key]``: a floating-point tensor shaped like ``p``, copied to ``p``'s device as ``dtype``."""
    if key not in entry:
        raise ValueError(f"{where} has no {key!r}")
    t = check_leaf(entry[key], f"{where}[{key!r}]")
    if t.shape != p.shape:
        raise ValueError(f"{where}[{key!r}] must have the parameter's shape {tuple(p.shape)}, got {tuple(t.shape)}")
    return t.detach().to(device=p.device, dtype=dtype, copy=True)


class ZOSGD(_ZOOptimizer):
    """Stochastic gradient descent on seed-compressed gradients, with optional (heavy-ball) momentum.

    A ``torch.optim.Optimizer``: param groups, ``state_dict`` / ``load_state_dict`` (torch's format:
    ``state[i]['momentum_buffer']``), ``add_param_group`` and the LR schedulers work as for
    ``torch.optim.SGD``; only :meth:`step` differs, taking the ``SeedGradient``.

    Args:
        params: the tensors the estimates are made for, in the same order: a list, any pytree or
            any iterable of tensors (``model.parameters()``), or a list of param groups (dicts
            with ``'params'`` and optionally ``'lr'``, ``'momentum'``).
        lr: learning rate (the default of the groups).
        momentum: heavy-ball coefficient (the default of the groups); 0 (the default) keeps no state.
    """

    _OPTIONS = ("lr", "momentum")

    def __init__(self, params: Any, lr: float, momentum: float = 0.0) -> None:
        # The tensors are checked (and numbered across groups) before the options, so that errors name the leaf; torch
        # alone would read a dict as a list of keys and refuse a bare tensor.
        groups = _param_groups(params)
        defaults = {"lr": _check_lr(lr), "momentum": check_real(momentum, "momentum", lo=0.0, hi=1.0)}
        super().__init__(groups, defaults)

    def _options(self, group: Mapping, where: str) -> Tuple[float, float]:
        return _check_lr(group["lr"], f"{where}['lr']"), check_real(
            group["momentum"], f"{where}['momentum']", lo=0.0, hi=1.0
        )

    def _check_state(self, entry: Any, p: torch.Tensor, where: str) -> Dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
        if entry.get("momentum_buffer") is None:
            return {}
        return {"momentum_buffer": _state_tensor(entry, "momentum_buffer", p, p.dtype, where)}

    @torch.no_grad()
    def step(self, grad: Optional[SeedGradient] = None) -> None:  # type: ignore[override]
        """``theta -= lr * g`` for each group, or with momentum ``buf = momentum * buf + g; theta -= lr * buf``.

        ``grad`` is the estimate for the parameters of every group, in group order (torch's
        ``step(closure)`` does not apply: without a ``SeedGradient`` this is a TypeError). A group
        without momentum is stepped by the fused kernel, its gradient never written; a group with
        momentum materializes its gradient once. Nothing changes if the estimate is unusable.
        Non-contiguous parameters are accepted; parameters whose elements share memory are refused.
        """
        sg, work = self._prepare(grad)
        family = sg._family()
        # The momentum groups' gradients are materialized before any parameter changes: an unusable estimate fails
        # there (or at the first fused step), leaving the parameters and the buffers as they were.
        grads = [
            sg._gradient(family, k, offset, p.device) if momentum else None
            for k, (p, offset, (_, momentum)) in enumerate(work)
        ]
        for (p, offset, (lr, momentum)), g in zip(work, grads):
            if g is None:
                sg._step_leaf(family, p, offset, lr)
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = buf = g
            else:
                buf.mul_(momentum).add_(g)
            p.sub_(buf, alpha=lr)


class ZOAdam(_ZOOptimizer):
    """Adam (Kingma & Ba, 2015) on seed-compressed gradients, with bias correction.

    A ``torch.optim.Optimizer`` like ``torch.optim.Adam`` (param groups, ``state_dict`` with
    ``state[i]['step']``, ``['exp_avg']`` and ``['exp_avg_sq']``, ``add_param_group``, the LR
    schedulers); only :meth:`step` differs, taking the ``SeedGradient``. The moments are float32 for
    half-precision parameters, else of the parameters' dtype.

    Args:
        params: the tensors the estimates are made for, in the same order: a list, any pytree or
            any iterable of tensors (``model.parameters()``), or a list of param groups (dicts
            with ``'params'`` and optionally ``'lr'``, ``'betas'``, ``'eps'``).
        lr: learning rate, as for ``torch.optim.Adam`` (the default of the groups).
        betas: moment decay rates, as for ``torch.optim.Adam`` (the default of the groups).
        eps: added to the denominator, as for ``torch.optim.Adam`` (the default of the groups).
    """

    _OPTIONS = ("lr", "betas", "eps")

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> None:
        groups = _param_groups(params)  # first, as for ZOSGD
        super().__init__(groups, {"lr": _check_lr(lr), "betas": _check_betas(betas), "eps": _check_eps(eps)})

    def _options(self, group: Mapping, where: str) -> Tuple[float, Tuple[float, float], float]:
        lr = _check_lr(group["lr"], f"{where}['lr']")
        return lr, _check_betas(group["betas"], f"{where}['betas']"), _check_eps(group["eps"], f"{where}['eps']")

    def _check_state(self, entry: Any, p: torch.Tensor, where: str) -> Dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
        if not entry:
            return {}
        step = entry.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:  # torch.optim.Adam keeps it as a tensor
            step = step.item()
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        dtype = accumulation_dtype(p.dtype)
        return {
            "step": _state_int(step, f"{where}['step']", 0, 2**63),
            "exp_avg": _state_tensor(entry, "exp_avg", p, dtype, where),
            "exp_avg_sq": _state_tensor(entry, "exp_avg_sq", p, dtype, where),
        }

    @torch.no_grad()
    def step(self, grad: Optional[SeedGradient] = None) -> None:  # type: ignore[override]
        """One Adam update of every group from the materialized estimate.

        ``grad`` is the estimate for the parameters of every group, in group order (torch's
        ``step(closure)`` does not apply: without a ``SeedGradient`` this is a TypeError). Nothing
        changes if the estimate is unusable. Non-contiguous parameters are accepted; parameters whose
        elements share memory are refused.
        """
        sg, work = self._prepare(grad)
        family = sg._family()
        # Every gradient is materialized before anything changes: an unusable estimate fails there.
        grads = [sg._gradient(family, k, offset, p.device) for k, (p, offset, _) in enumerate(work)]
        for (p, _, (lr, (b1, b2), eps)), g in zip(work, grads):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=accumulation_dtype(p.dtype))
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            c1, c2 = 1 - b1**t, 1 - b2**t
            g = g.to(device=m.device, dtype=m.dtype)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (m / c1) / ((v / c2).sqrt_().add_(eps))
            p.sub_(update.to(p.dtype), alpha=lr)
