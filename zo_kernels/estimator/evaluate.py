"""Evaluators: the perturbed losses of this rank's share of the samples, as ``(signs, k)`` blocks.

Four ways to evaluate, each reading the plan and writing only its own buffers (and the plan's
kept-noise sums it is given): :func:`loop_blocks` (one call of the function per evaluation, into a
scratch copy), :func:`inplace_blocks` (MeZO: the parameters' own storage, restored after every
sample), :func:`on_use_blocks` (each use of a parameter served its perturbed values; nothing
written) and :func:`batched_blocks` (``batch_size`` evaluations per ``torch.func.vmap`` call).
:func:`evaluate_share` picks them; a vmap failure is recorded on the decorated function's
:class:`EvaluatorState`, once, and the rest of the samples are evaluated by the loop.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch

from ..config import check_output
from ..noise.shared_weights import SharedWeights, Transients
from .plan import Plan, samples_per_call

Evaluate = Callable[[Sequence[torch.Tensor]], torch.Tensor]
#: ``weigh(block, scales)``: the weights ``w_i`` of a ``(signs, k)`` block of losses whose noise has ``scales``.
Weigh = Callable[[torch.Tensor, Union[float, torch.Tensor]], torch.Tensor]
Sums = List[Optional[torch.Tensor]]
#: A noise's ``perturb(i, scale)`` for one segment (:data:`zo_kernels.noise.base.Perturb`).
Perturb = Callable[[int, float], Optional[List[torch.Tensor]]]


class EvaluatorState:
    """Shared by every call of one decorated function: why vmap failed on it, and the warnings it was given."""

    __slots__ = ("vmap_failure", "warned")

    def __init__(self) -> None:
        self.vmap_failure: Optional[str] = None
        self.warned: Set[str] = set()


def evaluate_sample(
    evaluate: Evaluate, params: Sequence[torch.Tensor], index: int, sign: float, seed_text: str, record: bool = False
) -> torch.Tensor:
    """One perturbed loss as a 0-dim tensor, detached unless ``record``; errors say which sample raised."""
    try:
        out = evaluate(params)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"zo_kernels: raised while evaluating {_where(index, sign, seed_text)}")
        raise
    if type(out) is not torch.Tensor or out.ndim != 0 or not out.dtype.is_floating_point:
        check_output(out, _where(index, sign, seed_text))  # raises, naming the sample
    return out if record else out.detach()


def _where(index: int, sign: float, seed_text: str) -> str:
    """How errors name one evaluation (built only when one is raised: the loop runs per evaluation)."""
    return f"the function (sample {index}, {'+' if sign > 0 else '-'}sigma*z, {seed_text})"


def stack_losses(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-sample losses as one float64 vector (one conversion, not one per sample)."""
    if all(loss.dtype == losses[0].dtype and loss.device == losses[0].device for loss in losses):
        return torch.stack(list(losses)).to(torch.float64)
    return torch.stack([loss.to(device=losses[0].device, dtype=torch.float64) for loss in losses])


def loop_blocks(plan: Plan, evaluate: Evaluate, weigh: Weigh, sums: Sums, ids: Iterable[int]) -> List[torch.Tensor]:
    """One evaluation per call of the function, into the scratch copy: the ``(signs, k)`` blocks of ``ids``.

    Regenerable noise goes window by window (:func:`_loop_window`); a user distribution's sample by
    sample (:func:`_loop_sampled`).
    """
    ids = list(ids)
    if not plan.noise.regenerable:
        return _loop_sampled(plan, evaluate, weigh, sums, ids)
    width = plan.window if any(acc is not None for acc in sums) else max(1, len(ids))
    z = [None if acc is None else plan.noise.keep_buffer(seg) for seg, acc in zip(plan.segments, sums)]
    perturbers = [plan.noise.perturber(seg, plan.seed, keep) for seg, keep in zip(plan.segments, z)]
    # a window of one sample sums its kept noise where it lies, without a copy
    rows = [
        None if acc is None else keep.view(1, -1) if width == 1 else plan.noise.keep_buffer(seg, width)
        for seg, acc, keep in zip(plan.segments, sums, z)
    ]
    return [
        _loop_window(plan, evaluate, weigh, sums, ids[lo : lo + width], perturbers, z, rows)
        for lo in range(0, len(ids), width)
    ]


def _perturbed(plan: Plan, perturbers: Sequence[Perturb], kept: Sequence[object], i: int, k: int, scale: float) -> list:
    """The function's inputs for evaluation ``k`` of sample ``i``: ``theta + scale * z_i`` per segment.

    Where a segment's noise is kept, evaluations after the first (the antithetic twin) are formed
    from the kept ``z`` instead of generating it again.
    """
    inputs: List[torch.Tensor] = []
    for perturb, seg, keep in zip(perturbers, plan.segments, kept):
        made = plan.noise.twin(seg, keep, scale) if k > 0 and keep is not None else perturb(i, scale)
        inputs.extend(seg.views if made is None else made)
    return inputs


def _loop_window(
    plan: Plan,
    evaluate: Evaluate,
    weigh: Weigh,
    sums: Sums,
    ids: Sequence[int],
    perturbers: Sequence[Perturb],
    z: Sequence[Optional[torch.Tensor]],
    rows: Sequence[Optional[torch.Tensor]],
) -> torch.Tensor:
    """The ``(signs, len(ids))`` losses of a window of samples; where noise is kept, ``sums += sum_i w_i z_i``.

    A kept sample's noise ``z`` is written by its perturbation (the antithetic twin is formed from
    it) and copied into the window's ``rows``; the window's weights are formed once and summed in
    one matrix-vector product per segment, so the per-sample cost is the evaluation itself.
    """
    noise, sigma, signs = plan.noise, plan.config.sigma, plan.signs
    losses = []
    for r, i in enumerate(ids):
        for k, sign in enumerate(signs):
            inputs = _perturbed(plan, perturbers, z, i, k, sign * sigma * plan.scales[i])
            losses.append(evaluate_sample(evaluate, inputs, i, sign, plan.seed_text))
        for row, keep in zip(rows, z):
            if row is not None and row.shape[0] > 1:  # a one-sample window is the kept noise itself
                row[r].copy_(keep.view(-1))
    block = stack_losses(losses).view(len(ids), len(signs)).t()
    if any(row is not None for row in rows):
        scales = torch.tensor([plan.scales[i] for i in ids], dtype=torch.float64)
        weights = weigh(block, scales.to(block.device))
        for acc, row in zip(sums, rows):
            if row is not None:
                noise.accumulate_rows(acc, row[: len(ids)], weights)
    return block


def _loop_sampled(plan: Plan, evaluate: Evaluate, weigh: Weigh, sums: Sums, ids: Sequence[int]) -> List[torch.Tensor]:
    """A user distribution's samples, one evaluation per call: the ``(signs, 1)`` blocks of ``ids``.

    A noise's perturbation writes a segment's scratch ``views`` (returning None), or returns new
    tensors for the segment's leaves. Where ``sums[k]`` is a tensor, each sample's noise is kept
    while perturbing (the antithetic twin is formed from it) and ``w_i z_i`` accumulated into it at
    once, in sample order. With fitness shaping the weights need every loss first, so each sample's
    kept noise is held (new buffers per sample) and summed after the last evaluation.
    """
    noise, sigma = plan.noise, plan.config.sigma
    deferred: List[Tuple[int, list]] = []  # (sample, its kept noise per segment) while shaping
    shaping = plan.config.fitness_shaping is not None
    kept = [None if acc is None else noise.keep_buffer(seg) for seg, acc in zip(plan.segments, sums)]
    perturbers = [noise.perturber(seg, plan.seed, z) for seg, z in zip(plan.segments, kept)]
    blocks = []
    for i in ids:
        if shaping and any(z is not None for z in kept) and deferred:
            kept = [None if acc is None else noise.keep_buffer(seg) for seg, acc in zip(plan.segments, sums)]
            perturbers = [noise.perturber(seg, plan.seed, z) for seg, z in zip(plan.segments, kept)]
        sample_losses = []
        for k, sign in enumerate(plan.signs):
            inputs = _perturbed(plan, perturbers, kept, i, k, sign * sigma * plan.scales[i])
            sample_losses.append(evaluate_sample(evaluate, inputs, i, sign, plan.seed_text))
        blocks.append(stack_losses(sample_losses)[:, None])
        if shaping and any(z is not None for z in kept):
            deferred.append((i, kept))
        elif any(z is not None for z in kept):
            _accumulate_kept(noise, sums, kept, weigh(blocks[-1], plan.scales[i])[0])
    if deferred:
        scales = torch.tensor([plan.scales[i] for i, _ in deferred], dtype=torch.float64)
        weights = weigh(torch.cat(blocks, dim=1), scales.to(blocks[0].device))
        for (_, z), w in zip(deferred, weights):
            _accumulate_kept(noise, sums, z, w)
    return blocks


def _accumulate_kept(noise, sums: Sums, kept: list, weight: torch.Tensor) -> None:
    """``sums[k] += weight * z_k`` for each segment whose noise is kept."""
    for acc, z in zip(sums, kept):
        if acc is not None and z is not None:
            noise.accumulate(acc, z, weight)


def inplace_blocks(plan: Plan, evaluate: Evaluate, ids: Iterable[int]) -> List[torch.Tensor]:
    """MeZO: perturb the parameters' own storage (``+sigma z``; antithetic ``+, -2, +``) and restore it.

    Restoration happens after every sample, also when the function raises.
    """
    sigma = plan.config.sigma
    perturbers = [plan.noise.perturber(seg, plan.seed, None) for seg in plan.segments]
    blocks = []
    for i in ids:
        sample_losses = []
        applied = 0.0  # the multiple of z_i currently added to the parameters
        try:
            for sign in plan.signs:
                scale = sign * sigma * plan.scales[i]
                for perturb in perturbers:
                    perturb(i, scale - applied)
                applied = scale
                sample_losses.append(evaluate_sample(evaluate, plan.scratch, i, sign, plan.seed_text))
        finally:
            if applied != 0.0:  # restore, also when the function raised
                for perturb in perturbers:
                    perturb(i, -applied)
        blocks.append(stack_losses(sample_losses)[:, None])
    return blocks


def on_use_blocks(
    plan: Plan, evaluate: Evaluate, state: EvaluatorState, ids: Iterable[int]
) -> List[torch.Tensor]:
    """``perturb='on_use'``: the function gets the parameters themselves, each use served ``theta + s sigma z_i``.

    Nothing is written to the parameters, so there is nothing to restore when the function raises.
    A parameter that no torch operation read during an evaluation is named in a warning, once per
    decorated function: it was evaluated unperturbed, or read where the mode cannot see it.
    """
    noise, sigma = plan.noise, plan.config.sigma
    largest = max((p.numel() * p.element_size() for p in plan.scratch), default=0)
    reuse = reuse_bytes(largest)
    # room for the largest tensor and the small ones read beside it (a bias with its weight)
    transients = Transients(largest + largest // 32)
    blocks = []
    for i in ids:
        sample_losses = []
        for sign in plan.signs:
            uses = SharedWeights(reuse_bytes=reuse, transients=transients)
            for seg in plan.segments:
                noise.serve(seg, plan.seed, i, sign * sigma * plan.scales[i], uses)
            with uses:
                sample_losses.append(evaluate_sample(evaluate, plan.scratch, i, sign, plan.seed_text))
            if len(uses.served) < len(plan.scratch):
                _warn_unserved(state, plan.scratch, uses.served)
        blocks.append(stack_losses(sample_losses)[:, None])
    return blocks


#: The floor of the bytes of perturbed values an evaluation under ``perturb='on_use'`` may keep for
#: repeated uses (see :func:`reuse_bytes`).
REUSE_MIN_BYTES = 64 << 20


def reuse_bytes(largest: int) -> int:
    """How many bytes of served values one evaluation keeps for tensors read more than once.

    ``largest``: the largest parameter's bytes.

    Regenerating a tensor at every use costs its generation again (an RNN's weight read at each time
    step: measured 6x the evaluation time of ``'copy'``, docs/memory.md); keeping it, from its
    second use in the evaluation, costs memory. The bound is the largest parameter's bytes (so at
    most one more largest tensor beside the one being served), or 64 MiB if more, and a tensor read
    only once is never kept, so a model without repeated uses stays at inference + one tensor.
    """
    return max(largest, REUSE_MIN_BYTES)


def _warn_unserved(state: EvaluatorState, leaves: Sequence[torch.Tensor], served: Set[int]) -> None:
    if "unserved" in state.warned:
        return
    state.warned.add("unserved")
    missed = [f"leaf {k} (a {list(p.shape)} {p.dtype} tensor)" for k, p in enumerate(leaves) if id(p) not in served]
    warnings.warn(
        f"zo_kernels: perturb='on_use': {', '.join(missed)} of the differentiated parameters "
        f"{'was' if len(missed) == 1 else 'were'} not read by any torch operation while the function was evaluated, "
        "so the evaluation saw unperturbed values and the estimate for it is noise. "
        "Either the function does not use it, or reads it where perturb='on_use' cannot serve it (a C++/CUDA "
        "extension given its data pointer, a program compiled ahead of time holding it as a constant, a copy made "
        "before the call); "
        "use perturb='copy' for such a function. Warned once per decorated function (per call of estimate()).",
        RuntimeWarning,
        stacklevel=5,
    )


class _Batch:
    """The buffers of batched evaluation: ``width`` samples' rows per segment (and their kept noise)."""

    def __init__(self, plan: Plan, sums: Sums, width: int) -> None:
        signs, noise = len(plan.signs), plan.noise
        self.plan, self.width = plan, width
        self.buffers = [noise.batch_buffer(seg, width * signs) for seg in plan.segments]
        self.kept = [None if acc is None else noise.keep_buffer(seg, width) for seg, acc in zip(plan.segments, sums)]
        self.scales = torch.tensor(plan.scales, dtype=torch.float64)
        self.sign_scales = torch.tensor([sign * plan.config.sigma for sign in plan.signs], dtype=torch.float64)
        self.counts: List[int] = []  # how many of the vmapped tensors each segment contributes

    def perturb(self, lo: int, hi: int) -> List[torch.Tensor]:
        """The tensors vmap maps over for samples ``lo..hi-1`` (each noise's ``batch_inputs``, segment by segment)."""
        ids = torch.arange(lo, hi, dtype=torch.int64)
        row_scales = self.scales[lo:hi, None] * self.sign_scales
        rows = (hi - lo) * len(self.plan.signs)
        inputs: List[torch.Tensor] = []
        self.counts = []
        for seg, buf, z in zip(self.plan.segments, self.buffers, self.kept):
            keep = None if z is None else z[: hi - lo]
            made = self.plan.noise.batch_inputs(
                seg, None if buf is None else buf[:rows], self.plan.seed, ids, row_scales, keep
            )
            self.counts.append(len(made))
            inputs.extend(made)
        return inputs

    def member(self, evaluate: Evaluate) -> Callable[..., torch.Tensor]:
        """The function vmap runs: one member's slices of the inputs -> the leaves -> ``evaluate``."""
        noise, segments = self.plan.noise, self.plan.segments

        def run(*tensors: torch.Tensor) -> torch.Tensor:
            rewrites: dict = {}
            leaves: List[torch.Tensor] = []
            start = 0
            for seg, count in zip(segments, self.counts):
                leaves.extend(noise.member_leaves(seg, tensors[start : start + count], rewrites))
                start += count
            with noise.member_context(rewrites):
                return evaluate(leaves)

        return run

    def accumulate(self, sums: Sums, weigh: Weigh, block: torch.Tensor, lo: int, hi: int) -> None:
        """``sums += sum_i w_i z_i`` over the block's kept noise (one matrix-vector product per segment)."""
        if all(z is None for z in self.kept):
            return
        w = weigh(block, self.scales[lo:hi].to(block.device))
        for acc, z in zip(sums, self.kept):
            if acc is not None and z is not None:
                self.plan.noise.accumulate_rows(acc, z[: hi - lo], w)


def check_batched_output(out: object, rows: int, lo: int, hi: int) -> torch.Tensor:
    """Return ``out`` if it is the ``(rows,)`` floating-point losses of samples ``lo..hi-1`` under vmap."""
    if not isinstance(out, torch.Tensor) or out.shape != (rows,) or not out.dtype.is_floating_point:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"the function must return a floating-point scalar tensor for every sample, but under vmap it "
            f"returned {got} for samples {lo}..{hi - 1} (expected shape ({rows},) over the batch)"
        )
    return out


def record_vmap_failure(state: EvaluatorState, exc: BaseException, batch_size: Optional[int]) -> None:
    """Remember on ``state`` that vmap cannot run the function, and warn once why."""
    state.vmap_failure = f"{type(exc).__name__}: {exc}".split("\n")[0]
    warnings.warn(
        f"zo_kernels: batch_size={batch_size} is ignored from now on for this function: torch.func.vmap "
        f"cannot run it ({state.vmap_failure}); its samples are evaluated one by one",
        RuntimeWarning,
        stacklevel=3,
    )


def batched_blocks(
    plan: Plan, evaluate: Evaluate, weigh: Weigh, state: EvaluatorState, sums: Sums
) -> List[torch.Tensor]:
    """Losses of this rank's samples as ``(signs, k)`` blocks, one vmapped call per block.

    A block holds ``batch_size // signs`` samples (an antithetic pair is never split, so at least
    one). Where ``sums[k]`` is a tensor, the block's noise is kept and ``sum_i w_i z_i`` accumulated
    into it. Stops early (returning the blocks done so far) the first time ``torch.func.vmap``
    cannot run the function; that is recorded on ``state`` and warned about once.
    """
    first, count, signs = plan.share.first, plan.share.count, len(plan.signs)
    batch = _Batch(plan, sums, samples_per_call(plan.config, count))
    batched = torch.func.vmap(batch.member(evaluate))
    blocks: List[torch.Tensor] = []
    for lo in range(first, first + count, batch.width):
        hi = min(lo + batch.width, first + count)
        leaves = batch.perturb(lo, hi)
        try:
            out = batched(*leaves)
        except (RuntimeError, NotImplementedError) as exc:  # what torch raises for what vmap cannot run
            record_vmap_failure(state, exc, plan.config.batch_size)
            break
        except Exception as exc:  # the function's own error (ValueError, KeyError, ...): not vmap's doing
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(
                    f"zo_kernels: raised while evaluating samples {lo}..{hi - 1} together under torch.func.vmap "
                    f"(batch_size={plan.config.batch_size}, seed={plan.seed})"
                )
            raise
        out = check_batched_output(out, (hi - lo) * signs, lo, hi)
        block = out.detach().to(torch.float64).view(hi - lo, signs).t()
        blocks.append(block)
        batch.accumulate(sums, weigh, block, lo, hi)
    return blocks


def evaluate_share(
    plan: Plan, evaluate: Evaluate, weigh: Weigh, state: EvaluatorState
) -> Tuple[List[torch.Tensor], Sums]:
    """The loss blocks of this rank's share, and the kept-noise sums that cover every sample (None where not kept).

    Batched evaluation that stops part-way leaves its sums incomplete: they are dropped (the
    reducer regenerates every sample's noise) and the loop evaluates the rest without keeping any.
    """
    first, count = plan.share.first, plan.share.count
    if plan.config.inplace:
        return inplace_blocks(plan, evaluate, range(first, first + count)), plan.sums
    if plan.config.on_use:

        def loop(sums: Sums, ids: Iterable[int]) -> List[torch.Tensor]:
            return on_use_blocks(plan, evaluate, state, ids)  # keeps no noise: ``sums`` are all None
    else:

        def loop(sums: Sums, ids: Iterable[int]) -> List[torch.Tensor]:
            return loop_blocks(plan, evaluate, weigh, sums, ids)

    if not plan.batching:
        return loop(plan.sums, range(first, first + count)), plan.sums
    blocks = batched_blocks(plan, evaluate, weigh, state, plan.sums)
    done = sum(block.shape[1] for block in blocks)
    if done == count:
        return blocks, plan.sums
    rest = loop([None] * len(plan.segments), range(first + done, first + count))
    return blocks + rest, [None] * len(plan.segments)
