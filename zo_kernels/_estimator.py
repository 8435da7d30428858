"""The evolution-strategy gradient estimate: evaluate perturbed losses, weight them, reduce the noise.

Two paths share the weights formula:

- *fused* (built-in distributions): per sample, a backend writes ``theta + sigma * z_i`` into a
  reusable scratch buffer; after all evaluations one ``reduce`` regenerates ``z_i`` and forms
  ``sum_i w_i z_i``. No tensor of size ``num_samples x n`` ever exists.
- *sampled* (any user distribution): TorchOpt's contract, one ``.sample(shape)`` per sample and per
  tensor, accumulated as it goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import backends as _backends
from . import distributed as _distributed
from ._validate import Sampler, check_output, check_sample
from .distributions import FusedDistribution, draw_seed
from .reference.noise import accumulation_dtype

Evaluate = Callable[[Sequence[torch.Tensor]], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """A loss evaluated for the estimate was NaN or infinite; the message names the sample and seed."""


@dataclass(frozen=True)
class Settings:
    """Everything about an estimate that is fixed when the decorator is applied."""

    method: str
    num_samples: int
    sigma: float
    seed: Union[None, int, torch.Generator]
    backend: Optional[str]
    fused: Optional[FusedDistribution]
    sampler: Optional[Sampler]
    inplace: bool = False
    #: A weak reference to the ``torch.distributed`` group: holding the group itself would keep a
    #: destroyed group's transport alive until interpreter exit, where gloo can abort the process.
    group_ref: Optional[Callable[[], Any]] = None
    batch_size: Optional[int] = None
    #: Shared by every call of one decorated function: why batched evaluation failed, once it has.
    batch_state: Dict[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def process_group(self) -> Any:
        """The process group the samples are spread over, or None."""
        if self.group_ref is None:
            return None
        group = self.group_ref()
        if group is None:
            raise RuntimeError(
                "process_group: the torch.distributed group given to the decorator no longer exists "
                "(destroy_process_group() was called); decorate the function again for a new group"
            )
        return group


#: Parameter dtypes that ``inplace=True`` accepts. Restoring ``theta + sigma z - sigma z`` rounds
#: twice per perturbation: about 1e-7 relative per cycle in float32, but up to 2**-8 in bfloat16 and
#: 2**-11 in float16 (tests/test_inplace.py measures both), which would visibly move the weights
#: after a few hundred samples. Half-precision parameters are refused rather than silently drifting.
INPLACE_DTYPES = (torch.float32, torch.float64)


def check_inplace_leaves(leaves: Sequence[torch.Tensor]) -> None:
    """Raise unless every leaf can be perturbed and restored in place."""
    for k, p in enumerate(leaves):
        if p.dtype not in INPLACE_DTYPES:
            raise TypeError(
                f"inplace=True needs float32 or float64 parameters, but leaf {k} is {p.dtype}: perturbing and "
                "restoring half-precision storage drifts by up to one rounding of that dtype per sample; "
                "use inplace=False (one scratch copy of the parameters) for such parameters"
            )
        if not p.is_contiguous():
            raise ValueError(f"inplace=True needs contiguous parameters, but leaf {k} is not contiguous")


def resolve_seed(seed: Union[None, int, torch.Generator]) -> int:
    """The 64-bit seed of one estimate: ``seed`` itself, or one draw from the generator (default: torch's)."""
    if isinstance(seed, int):
        return seed
    return draw_seed(seed)


def _signs(method: str) -> Sequence[float]:
    return (1.0, -1.0) if method == "antithetic" else (1.0,)


def _coefficient(method: str, sigma: float, num_samples: int) -> float:
    return (0.5 if method == "antithetic" else 1.0) / (sigma * num_samples)


def _evaluate_sample(
    evaluate: Evaluate, params: Sequence[torch.Tensor], index: int, sign: float, seed_text: str
) -> torch.Tensor:
    """One perturbed loss, as a detached 0-dim tensor; errors say which sample raised."""
    where = f"the function (sample {index}, {'+' if sign > 0 else '-'}sigma*z, {seed_text})"
    try:
        out = evaluate(params)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"zo_kernels: raised while evaluating {where}")
        raise
    return check_output(out, where).detach()


def _stack_losses(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-sample losses as one float64 vector (one conversion, not one per sample)."""
    if all(loss.dtype == losses[0].dtype and loss.device == losses[0].device for loss in losses):
        return torch.stack(list(losses)).to(torch.float64)
    return torch.stack([loss.to(device=losses[0].device, dtype=torch.float64) for loss in losses])


def _raise_if_not_finite(losses: torch.Tensor, f0: Optional[torch.Tensor], method: str, seed_text: str) -> None:
    """One device sync for the whole estimate; name the first sample whose loss is NaN or inf."""
    finite = torch.isfinite(losses)
    if f0 is not None and method == "forward" and not bool(torch.isfinite(f0)):
        raise NonFiniteLossError(
            f"zero_order: the unperturbed loss f(theta) is {f0.item()} (method 'forward' uses it as baseline)"
        )
    if bool(finite.all()):
        return
    flat = (~finite).reshape(-1).nonzero()[0].item()
    sign, index = divmod(flat, losses.shape[-1])
    raise NonFiniteLossError(
        f"zero_order: the loss at sample {index} ({'-' if sign else '+'}sigma*z) is "
        f"{losses.reshape(-1)[flat].item()}; {seed_text}. Lower sigma or check the function's domain."
    )


def _weights(losses: torch.Tensor, f0: torch.Tensor, grad_out: torch.Tensor, s: Settings) -> torch.Tensor:
    """Per-sample weights ``w_i`` so that the estimate is ``sum_i w_i z_i`` (chain rule included)."""
    if s.method == "antithetic":
        diffs = losses[0] - losses[1]
    elif s.method == "forward":
        diffs = losses[0] - f0.to(losses)
    else:
        diffs = losses[0]
    return diffs * (grad_out.detach().to(losses) * _coefficient(s.method, s.sigma, s.num_samples))


@dataclass
class _Segment:
    """A contiguous range of the flat parameter vector that one kernel call perturbs or reduces."""

    backend: _backends.Backend
    theta: torch.Tensor  # flat, contiguous, detached
    out: torch.Tensor  # flat scratch buffer of the same size
    offset: int
    parts: List[Tuple[int, int, torch.Size]]  # (start, stop, shape) of each leaf inside the segment


#: Leaves are concatenated into one segment (one kernel call per sample) while the segment stays
#: below this many elements; the concatenation is a copy, so large tensors get their own segment
#: and are read in place: then the only parameter-sized allocation is the scratch buffer.
CONCAT_MAX_NUMEL = 1 << 20


def _segments(
    leaves: Sequence[torch.Tensor], offsets: Sequence[int], chosen: Sequence[_backends.Backend]
) -> Tuple[List[_Segment], List[torch.Tensor]]:
    """Group leaves into few kernel calls, and the perturbed views the function sees.

    Consecutive small leaves that share a device, dtype and backend are concatenated into one flat
    buffer (their flat offsets are consecutive by construction), so a model with hundreds of small
    tensors costs one perturb call per sample instead of hundreds.
    """
    segments: List[_Segment] = []
    groups: List[List[int]] = []
    size = 0
    for k, p in enumerate(leaves):
        prev = leaves[groups[-1][0]] if groups else None
        joinable = (
            prev is not None
            and (prev.device, prev.dtype) == (p.device, p.dtype)
            and chosen[k] is chosen[groups[-1][0]]
            and size + p.numel() <= CONCAT_MAX_NUMEL
        )
        if joinable:
            groups[-1].append(k)
            size += p.numel()
        else:
            groups.append([k])
            size = p.numel()
    scratch: List[torch.Tensor] = []
    for group in groups:
        base = offsets[group[0]]
        if len(group) == 1 and leaves[group[0]].is_contiguous():
            theta = leaves[group[0]].detach().view(-1)  # no copy
        else:
            theta = torch.cat([leaves[k].detach().reshape(-1) for k in group])
        out = torch.empty_like(theta)
        parts = [(offsets[k] - base, offsets[k + 1] - base, leaves[k].shape) for k in group]
        segments.append(_Segment(chosen[group[0]], theta, out, base, parts))
        scratch.extend(out[lo:hi].view(shape) for lo, hi, shape in parts)
    return segments, scratch


@dataclass
class FusedPass:
    """What the evaluation loop of one fused estimate produced."""

    seed: int
    sample_ids: torch.Tensor  # int64, CPU
    scales: List[float]  # per-sample noise scale: sqrt(n)/|g_i| for Sphere, else 1
    losses: torch.Tensor  # float64 (len(signs), N): f(theta + sign * sigma * z_i)
    segments: List[_Segment]
    sums: List[Optional[torch.Tensor]]  # per segment: sum_i w_i z_i already accumulated, or None

    def weights(self, f0: torch.Tensor, grad_out: torch.Tensor, s: Settings) -> torch.Tensor:
        """The float64 weights ``w_i`` of ``sum_i w_i z_i``, sphere scales included."""
        scales = torch.tensor(self.scales, dtype=torch.float64).to(self.losses.device)
        return _weights(self.losses, f0, grad_out, s) * scales


def fused_pass(
    evaluate: Evaluate,
    leaves: Sequence[torch.Tensor],
    f0: torch.Tensor,
    grad_out: torch.Tensor,
    s: Settings,
    accumulate: bool = True,
) -> FusedPass:
    """Evaluate the N perturbed losses with the fused stream (and, with ``accumulate``, the kept-noise sums)."""
    noise = s.fused
    assert noise is not None
    seed = resolve_seed(s.seed)
    first, count = 0, s.num_samples
    if s.process_group is not None:
        seed = _distributed.shared_seed(seed, s.process_group, leaves[0].device if leaves else torch.device("cpu"))
        first, count = _distributed.share(s.num_samples, s.process_group)
    chosen = [_backends.select(p.device, p.dtype, s.backend) for p in leaves]
    offsets = [0]
    for p in leaves:
        offsets.append(offsets[-1] + p.numel())
    total = offsets[-1]
    ids = torch.arange(s.num_samples, dtype=torch.int64)
    scales = [1.0] * s.num_samples
    if noise.sphere and total > 0:
        norms = chosen[0].squared_norms(noise.stream, seed, ids.to(leaves[0].device), total)
        scales = (math.sqrt(total) / norms.sqrt()).tolist()

    if s.inplace:
        check_inplace_leaves(leaves)
        # The parameters' own storage is perturbed and restored: no second copy exists. `.data`
        # keeps autograd's version counters out of it (the values are restored before returning).
        segments = [
            _Segment(b, p.data.view(-1), p.data.view(-1), off, [(0, p.numel(), p.shape)])
            for b, p, off in zip(chosen, leaves, offsets)
        ]
        scratch = [p.data for p in leaves]
    else:
        segments, scratch = _segments(leaves, offsets, chosen)
    batching = s.batch_size is not None and "failed" not in s.batch_state
    # Keep each sample's noise and accumulate it at once where that beats regenerating it in
    # `reduce` (large CPU vectors of normals); the sum still runs over samples in order.
    rows = _samples_per_call(s, count) if batching else 1  # samples whose noise one accumulation reads
    sums: List[Optional[torch.Tensor]] = [
        torch.zeros(seg.theta.shape, dtype=accumulation_dtype(seg.theta.dtype), device=seg.theta.device)
        if accumulate
        and not s.inplace
        and s.process_group is None  # every rank rebuilds all N samples: nothing to keep
        and seg.backend.prefers_kept_noise(noise.stream, seg.theta.numel(), rows)
        else None
        for seg in segments
    ]

    context = _Share(evaluate, segments, noise.stream, seed, scales, f0, grad_out, s)

    def evaluate_share() -> List[torch.Tensor]:
        blocks: List[torch.Tensor] = []
        if batching:
            blocks = _evaluate_batched(context, sums, first, count)
            done = sum(block.shape[1] for block in blocks)
            if done < count:  # vmap failed part-way: the kept sums miss the rest, `reduce` redoes them all
                sums[:] = [None] * len(segments)
            loop_sums: List[Optional[torch.Tensor]] = [None] * len(segments)
        else:
            done, loop_sums = 0, sums
        ids = range(first + done, first + count)
        return blocks + _evaluate_loop(context, scratch, loop_sums, ids)

    failure: Optional[BaseException] = None
    try:
        blocks = evaluate_share()
    except Exception as exc:
        if s.process_group is None:
            raise
        # Still take part in the gather, flagged, so that the other ranks raise instead of waiting.
        failure, blocks = exc, []
    signs = _signs(s.method)
    if blocks:
        losses = torch.cat(blocks, dim=1)
    else:  # a rank with no share of the samples (or one whose function raised)
        losses = torch.zeros((len(signs), 0), dtype=torch.float64, device=f0.device)
    if s.process_group is not None:
        losses, failed_ranks = _distributed.gather_losses(losses, s.num_samples, s.process_group, failure is not None)
        if failure is not None:
            raise failure
        if failed_ranks:
            raise RuntimeError(
                f"zo_kernels: the function raised on rank(s) {failed_ranks} while evaluating their share of the "
                "samples (their tracebacks say which sample); no gradient was formed on any rank"
            )
    _raise_if_not_finite(losses, f0, s.method, context.seed_text)
    return FusedPass(seed, ids, scales, losses, segments, sums)


@dataclass(frozen=True)
class _Share:
    """What both evaluation paths (loop and batched) of one rank's share of the samples read."""

    evaluate: Evaluate
    segments: Sequence[_Segment]
    stream: str
    seed: int
    scales: Sequence[float]  # per-sample noise scale (Sphere), indexed by sample id
    f0: torch.Tensor
    grad_out: torch.Tensor
    s: Settings

    @property
    def seed_text(self) -> str:
        """How error messages name the noise."""
        return f"seed={self.seed}"

    def weights(self, block: torch.Tensor, scales: Union[float, torch.Tensor]) -> torch.Tensor:
        """The weights ``w_i`` of a ``(signs, k)`` block of losses whose samples have noise ``scales``."""
        return _weights(block, self.f0, self.grad_out, self.s) * scales


def _evaluate_loop(
    share: _Share,
    scratch: Sequence[torch.Tensor],
    sums: Sequence[Optional[torch.Tensor]],
    ids: Iterable[int],
) -> List[torch.Tensor]:
    """One evaluation per call of the function: the ``(signs, 1)`` loss blocks of samples ``ids``.

    Where ``sums[k]`` is a tensor, each sample's noise is kept while perturbing (the antithetic twin
    is formed from it) and ``w_i z_i`` accumulated into it at once, in sample order.
    """
    s = share.s
    kept = [
        None if acc is None else torch.empty(seg.theta.shape, dtype=torch.float32, device=seg.theta.device)
        for seg, acc in zip(share.segments, sums)
    ]
    perturbers = [
        seg.backend.prepare_perturb(
            seg.out, seg.theta, share.stream, share.seed, seg.offset, **({} if z is None else {"keep": z})
        )
        for seg, z in zip(share.segments, kept)
    ]
    signs = _signs(s.method)
    blocks = []
    for i in ids:
        sample_losses = []
        applied = 0.0  # in place: the multiple of z_i currently added to the parameters
        try:
            for k, sign in enumerate(signs):
                scale = sign * s.sigma * share.scales[i]
                for perturb, seg, z in zip(perturbers, share.segments, kept):
                    if k > 0 and z is not None:  # antithetic twin: theta - sigma z from the kept z
                        torch.add(seg.theta, z, alpha=scale, out=seg.out)
                    else:
                        perturb(i, scale - applied if s.inplace else scale)
                applied = scale
                sample_losses.append(_evaluate_sample(share.evaluate, scratch, i, sign, share.seed_text))
        finally:
            if s.inplace and applied != 0.0:  # restore, also when the function raised
                for perturb in perturbers:
                    perturb(i, -applied)
        blocks.append(_stack_losses(sample_losses)[:, None])
        if any(z is not None for z in kept):
            w = share.weights(blocks[-1], share.scales[i])[0]
            for acc, z in zip(sums, kept):
                if acc is not None and z is not None:
                    acc.addcmul_(z, w.to(acc.dtype))
    return blocks


def _samples_per_call(s: Settings, count: int) -> int:
    """Samples per vmapped call: ``batch_size`` evaluations, an antithetic pair never split."""
    return max(1, min(count, (s.batch_size or 1) // len(_signs(s.method))))


def _evaluate_batched(share: _Share, sums: List[Optional[torch.Tensor]], first: int, count: int) -> List[torch.Tensor]:
    """Losses of samples ``first, first + 1, ...`` as ``(signs, k)`` blocks, one vmapped call per block.

    A block holds ``batch_size // signs`` samples (an antithetic pair is never split, so at least
    one), perturbed by one ``perturb_rows`` call per segment. Where ``sums[k]`` is a tensor, the
    block's noise is kept and ``sum_i w_i z_i`` accumulated into it with one matrix-vector product.
    Stops early (returning the blocks done so far) the first time ``torch.func.vmap`` cannot run
    the function; that is recorded in ``s.batch_state`` and warned about once, and the caller's
    loop evaluates the rest one by one from then on.
    """
    s = share.s
    signs = _signs(s.method)
    width = _samples_per_call(s, count)
    buffers = [
        torch.empty((width * len(signs), seg.theta.numel()), dtype=seg.theta.dtype, device=seg.theta.device)
        for seg in share.segments
    ]
    kept = [
        None if acc is None else torch.empty((width, seg.theta.numel()), dtype=torch.float32, device=acc.device)
        for seg, acc in zip(share.segments, sums)
    ]
    all_scales = torch.tensor(share.scales, dtype=torch.float64)
    sign_scales = torch.tensor([sign * s.sigma for sign in signs], dtype=torch.float64)
    batched = torch.func.vmap(lambda *tensors: share.evaluate(list(tensors)))
    blocks: List[torch.Tensor] = []
    for lo in range(first, first + count, width):
        hi = min(lo + width, first + count)
        ids = torch.arange(lo, hi, dtype=torch.int64)
        row_scales = all_scales[lo:hi, None] * sign_scales
        rows = (hi - lo) * len(signs)
        for seg, buf, z in zip(share.segments, buffers, kept):
            keep = None if z is None else z[: hi - lo]
            seg.backend.perturb_rows(
                buf[:rows], seg.theta, share.stream, share.seed, ids, row_scales, seg.offset, keep=keep
            )
        leaves = [
            buf[:rows, a:b].view(rows, *shape) for seg, buf in zip(share.segments, buffers) for a, b, shape in seg.parts
        ]
        try:
            out = batched(*leaves)
        except (RuntimeError, NotImplementedError) as exc:  # what torch raises for what vmap cannot run
            s.batch_state["failed"] = f"{type(exc).__name__}: {exc}".split("\n")[0]
            warnings.warn(
                f"zo_kernels: batch_size={s.batch_size} is ignored from now on for this function: torch.func.vmap "
                f"cannot run it ({s.batch_state['failed']}); its samples are evaluated one by one",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        except Exception as exc:  # the function's own error (ValueError, KeyError, ...): not vmap's doing
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(
                    f"zo_kernels: raised while evaluating samples {lo}..{hi - 1} together under torch.func.vmap "
                    f"(batch_size={s.batch_size}, seed={share.seed})"
                )
            raise
        if not isinstance(out, torch.Tensor) or out.shape != (rows,) or not out.dtype.is_floating_point:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(
                f"the function must return a floating-point scalar tensor for every sample, but under vmap it "
                f"returned {got} for samples {lo}..{hi - 1} (expected shape ({rows},) over the batch)"
            )
        block = out.detach().to(torch.float64).view(hi - lo, len(signs)).t()
        blocks.append(block)
        if any(z is not None for z in kept):
            w = share.weights(block, all_scales[lo:hi].to(block.device))
            for acc, z in zip(sums, kept):
                if acc is not None and z is not None:
                    acc.addmv_(z[: hi - lo].t().to(acc.dtype), w.to(acc.dtype))
    return blocks


def _fused_gradients(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], f0: torch.Tensor, grad_out: torch.Tensor, s: Settings
) -> List[torch.Tensor]:
    done = fused_pass(evaluate, leaves, f0, grad_out, s)
    if any(acc is None for acc in done.sums):
        weights = done.weights(f0, grad_out, s)
    grads = []
    for seg, acc in zip(done.segments, done.sums):
        if acc is not None:
            g = acc.to(seg.theta.dtype)
        else:
            g = torch.zeros(seg.theta.shape, dtype=seg.theta.dtype, device=seg.theta.device)
            w = weights.to(device=g.device, dtype=accumulation_dtype(g.dtype))
            seg.backend.reduce(g, w, done.sample_ids.to(g.device), s.fused.stream, done.seed, seg.offset)
        grads.extend(g[lo:hi].view(shape) for lo, hi, shape in seg.parts)
    return grads


@contextlib.contextmanager
def _seeded_rng(seed: Union[None, int, torch.Generator], leaves: Sequence[torch.Tensor]) -> Iterator[str]:
    """Run a user distribution under ``seed`` without disturbing torch's global RNG state."""
    if seed is None:
        yield "seed=None (torch's global RNG)"
        return
    value = resolve_seed(seed)
    devices = sorted({p.device.index or 0 for p in leaves if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(value)
        yield f"seed={value}"


def _sampled_gradients(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], f0: torch.Tensor, grad_out: torch.Tensor, s: Settings
) -> List[torch.Tensor]:
    sampler = s.sampler
    assert sampler is not None
    thetas = [p.detach() for p in leaves]
    sums = [torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device) for p in leaves]
    with _seeded_rng(s.seed, leaves) as seed_text:
        rows: List[List[torch.Tensor]] = [[] for _ in _signs(s.method)]
        for i in range(s.num_samples):
            zs = [
                check_sample(sampler(p.shape), p, f"sample {i} of the distribution for a {tuple(p.shape)} tensor")
                for p in thetas
            ]
            for r, sign in enumerate(_signs(s.method)):
                perturbed = [theta + (sign * s.sigma) * z for theta, z in zip(thetas, zs)]
                rows[r].append(_evaluate_sample(evaluate, perturbed, i, sign, seed_text))
            w = _weights(_stack_losses([r[i] for r in rows])[:, None], f0, grad_out, s)[0]
            for acc, z in zip(sums, zs):
                acc.add_(z.to(acc.dtype) * w.to(acc.dtype))
        losses = torch.stack([_stack_losses(r) for r in rows])
        _raise_if_not_finite(losses, f0, s.method, seed_text)
    return [acc.to(p.dtype) for acc, p in zip(sums, leaves)]


def estimate_gradients(
    evaluate: Evaluate, leaves: Sequence[torch.Tensor], f0: torch.Tensor, grad_out: torch.Tensor, s: Settings
) -> List[torch.Tensor]:
    """The ES estimate of ``grad_out * d f / d leaves`` for the smoothed objective, one tensor per leaf.

    ``evaluate`` maps a list of tensors shaped like ``leaves`` to the scalar loss; ``f0`` is the
    unperturbed loss (the 'forward' method's baseline).
    """
    if s.fused is not None:
        grads = _fused_gradients(evaluate, leaves, f0, grad_out, s)
    else:
        grads = _sampled_gradients(evaluate, leaves, f0, grad_out, s)
    raise_if_estimate_not_finite(grads, s.sigma)
    return grads


def raise_if_estimate_not_finite(tensors: Sequence[torch.Tensor], sigma: float) -> None:
    """Every loss was finite, yet the estimate may overflow (weights ~ loss / (sigma N)): refuse to return it."""
    # max and min propagate NaN and see +-inf, without the n-byte mask torch.isfinite(t) would allocate.
    extremes = [torch.stack([t.amax(), t.amin()]).to(torch.float64) for t in tensors if t.numel()]
    if extremes and not bool(torch.isfinite(torch.cat([e.to(extremes[0].device) for e in extremes])).all()):
        raise NonFiniteLossError(
            f"zero_order: every loss was finite but the gradient estimate overflows its dtype (its weights are "
            f"loss differences / (sigma * num_samples), with sigma={sigma}); raise sigma or scale the loss down"
        )
