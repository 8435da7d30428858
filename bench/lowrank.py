"""The low-rank section of ``make bench``: ``LowRank(1)`` batched vs Normal noise, TorchOpt, torcheggroll, inference.

Run from the repository root::

    python bench/lowrank.py                      # full run: a few minutes on 2 CPU cores
    python bench/lowrank.py --quick              # smoke run: tiny sizes, a few seconds of timing
    python bench/lowrank.py --sections gpu --out FILE   # the GPU section only (bench/gpu_all.sh)

One antithetic zero-order gradient step (``zo_kernels.zero_order(...)`` + ``.backward()``, every
``.grad`` written: 2N+1 evaluations) per contender, all measured side by side in one run:

1. **mlp** (CPU): the 264,970-parameter tanh MLP 1024 → 256 → 10, batch 256, cross-entropy, its
   parameters passed through ``torch.func.functional_call``; N = 100, sigma = 0.01. zo_kernels
   ``Normal()`` (loop and a ``batch_size`` sweep) and ``LowRank(1)`` (a ``batch_size`` sweep and the
   loop), TorchOpt 0.7.3 ``torchopt.diff.zero_order`` (Normal noise), torcheggroll 0.2.0
   (``TorchEggrollES(rank=1, pop_size=2N)``, one ``step``), and plain batched inference of the
   population's inputs (``model(x.repeat(2N, 1))`` under ``no_grad``): EGGROLL's yardstick.
2. **gpt** (CPU): an HF ``GPT2LMHeadModel`` built from a ``GPT2Config`` (eager attention: the CPU
   SDPA kernel has no vmap batching rule), ``TinyGPT`` of ``python/mezo_finetune.py`` where
   transformers is missing; next-token cross-entropy, N = 32: the same comparison.
3. **gpu** (only where ``torch.cuda.is_available()``): GPT-2 small (124M parameters), 256
   members (N = 128), 128 tokens each: ``LowRank(1)`` (``batch_size=256``: one vmapped call) vs
   ``Normal()`` (``batch_size=32``) vs batched inference; sized to fit ``bench/gpu_all.sh``'s 30 s stage.

Targets (each marked met / NOT met): on the CPU, LowRank best ≥ 2.5x faster than Normal best and
≥ 4x faster than torcheggroll, and LowRank step time ≤ 1.0x batched inference; on the GPU ≥ 10x
faster than Normal batched and ≥ 90% of batched inference's throughput. The report also lists
the ops that take a LowRank step's time (``torch.profiler``, one step of the best ``batch_size``).

TorchOpt, torcheggroll (``requirements-bench.txt``) and transformers are optional: a missing one
leaves its rows saying so and its targets unchecked. Timing is ``harness.time_call``'s; the
header (``harness.header``) names the date, device, versions and how busy the CPUs were.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import harness
import torch
import torch.nn.functional as F
from baselines import (
    EGGROLL_MISSING,
    TORCHOPT_MISSING,
    import_optional,
    import_torchopt,
    torcheggroll_step,
    torchopt_zero_order,
    version_of,
)
from harness import Problem, fmt_ratio, fmt_time

import zo_kernels
from zo_kernels.distributions import LowRank, Normal

torchopt = import_torchopt()  # optional: without it the TorchOpt row says TORCHOPT_MISSING

METHOD = "antithetic"
SIGMA = 0.01
LR = 1e-7  # torcheggroll's update: small, so repeated timing steps barely move its parameters
TRANSFORMERS_MISSING = "transformers not installed"
SECTIONS = ("mlp", "gpt", "gpu")
PROFILE_TOP = 15  # ops listed per profiled step
PROFILE_RUNS = 3  # profiled steps; the quickest is listed

Step = Callable[[], None]


torcheggroll = import_optional("torcheggroll")
transformers = import_optional("transformers")


def tqdm_write(line: str) -> None:
    """A line on stderr above the progress bar (``tqdm.write``), as each row is measured."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """One section's model, population and sweeps."""

    num_samples: int  # N: 2N members (antithetic pairs)
    normal_batches: Tuple[Optional[int], ...]  # batch_size values of Normal(); None = the loop
    lowrank_batches: Tuple[Optional[int], ...]  # batch_size values of LowRank(1); None = the loop
    model: Dict[str, int]
    baselines: bool  # TorchOpt and torcheggroll rows (not on the GPU: torcheggroll holds 2N copies of the weights)


@dataclass(frozen=True)
class Config:
    """Sizes and the time budget of one run."""

    quick: bool
    gpu_dry_run: bool  # the GPU section's code on the CPU at tiny sizes (tests)
    budget_s: float  # CPU timing of one point stops after this many seconds (harness.time_call)
    sizes: Dict[str, Sizes]

    @staticmethod
    def make(quick: bool, gpu_dry_run: bool = False) -> Config:
        """The full configuration, or the ``--quick`` smoke-run one."""
        if quick:
            mlp = Sizes(4, (None, 4), (8, None), dict(d_in=64, hidden=32, classes=10, batch=32), True)
            gpt = Sizes(4, (None, 4), (8,), dict(layers=2, d_model=32, heads=2, vocab=128, seq=16, batch=2), True)
            gpu = Sizes(8, (8,), (16,), dict(layers=2, d_model=128, heads=2, vocab=1024, seq=32, batch=1), False)
            return Config(True, gpu_dry_run, 0.05, dict(mlp=mlp, gpt=gpt, gpu=gpu))
        if gpu_dry_run:
            raise ValueError("--gpu-dry-run goes with --quick")
        mlp = Sizes(100, (None, 8, 20, 40), (26, 34, 50, 100, 200, None),
                    dict(d_in=1024, hidden=256, classes=10, batch=256), True)  # fmt: skip
        gpt = Sizes(32, (None, 8, 16), (16, 32, 64, None),
                    dict(layers=4, d_model=256, heads=4, vocab=4096, seq=64, batch=2), True)  # fmt: skip
        gpu = Sizes(128, (32,), (256,),
                    dict(layers=12, d_model=768, heads=12, vocab=50257, seq=128, batch=1), False)  # fmt: skip
        return Config(False, False, 3.0, dict(mlp=mlp, gpt=gpt, gpu=gpu))


# --------------------------------------------------------------------------------------------------
# Models: module(x) -> logits, the functional loss over leaf copies of its parameters
# --------------------------------------------------------------------------------------------------


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(..., classes)`` logits against integer targets of the leading shape."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LogitsOnly(torch.nn.Module):
    """An HF causal LM whose forward returns the logits tensor (no cache): what vmap and torcheggroll need."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, length, vocab)``."""
        return self.model(input_ids=tokens, use_cache=False).logits


@dataclass
class Model:
    """A network ``module(x) -> logits``, its data, and the :class:`harness.Problem` over copies of its parameters."""

    name: str
    module: torch.nn.Module
    problem: Problem

    @staticmethod
    def make(name: str, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Model:
        """The model with ``loss(params, x, y)`` = cross-entropy of ``functional_call(module, params, (x,))``."""
        module.eval()
        names = [n for n, _ in module.named_parameters()]

        def loss(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return logits_loss(torch.func.functional_call(module, dict(zip(names, params)), (x,)), y)

        params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
        return Model(name, module, Problem(name, loss, params, x, y))

    @property
    def numel(self) -> int:
        """Parameters."""
        return self.problem.numel


def mlp_model(sizes: Dict[str, int], device: torch.device) -> Model:
    """The tanh MLP ``d_in -> hidden -> classes`` and a batch with integer labels (seeded)."""
    torch.manual_seed(0)
    d_in, hidden, classes, batch = sizes["d_in"], sizes["hidden"], sizes["classes"], sizes["batch"]
    module = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
    x, y = torch.randn(batch, d_in), torch.randint(classes, (batch,))
    name = f"MLP {d_in}→{hidden}→{classes} tanh, batch {batch}, cross-entropy"
    return Model.make(name, module.to(device), x.to(device), y.to(device))


def gpt_model(sizes: Dict[str, int], device: torch.device) -> Model:
    """HF GPT-2 of ``sizes`` (eager attention, no dropout) on ``device``; ``TinyGPT`` without transformers."""
    torch.manual_seed(0)
    vocab, seq, batch = sizes["vocab"], sizes["seq"], sizes["batch"]
    tokens = torch.randint(vocab, (batch, seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if transformers is not None:
        config = transformers.GPT2Config(
            n_layer=sizes["layers"], n_embd=sizes["d_model"], n_head=sizes["heads"], vocab_size=vocab,
            n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            attn_implementation="eager",
        )  # fmt: skip
        with torch.device(device):
            module: torch.nn.Module = LogitsOnly(transformers.GPT2LMHeadModel(config))
        kind = "HF GPT2LMHeadModel (eager attention, tied LM head)"
    else:
        gpt = dict(vocab=vocab, seq_len=seq, d_model=sizes["d_model"], heads=sizes["heads"], layers=sizes["layers"],
                   ff=4 * sizes["d_model"], batch=batch)  # fmt: skip
        module = harness.tiny_gpt(gpt, device)[0]
        kind = f"TinyGPT of python/mezo_finetune.py ({TRANSFORMERS_MISSING})"
    numel = sum(p.numel() for p in module.parameters())
    name = (f"{kind}: {sizes['layers']} layers, d {sizes['d_model']}, {sizes['heads']} heads, vocab {vocab}; "
            f"{numel / 1e6:.2f}M parameters; batch {batch} x {seq} tokens, next-token cross-entropy")  # fmt: skip
    return Model.make(name, module, x, y)


# --------------------------------------------------------------------------------------------------
# Contenders: one step each
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One row: a kind (``normal``, ``lowrank``, ``torchopt``, ``torcheggroll``, ``inference``) and its batch size."""

    kind: str
    batch_size: Optional[int] = None

    @property
    def label(self) -> str:
        """The row's name in the table."""
        if self.kind in ("normal", "lowrank"):
            dist = "Normal()" if self.kind == "normal" else "LowRank(1)"
            how = "loop" if self.batch_size is None else f"batch_size={self.batch_size}"
            return f"zo_kernels {dist}, {how}"
        return {
            "torchopt": "TorchOpt 0.7.3 `zero_order` (Normal)",
            "torcheggroll": "torcheggroll `TorchEggrollES(rank=1)` step",
            "inference": "batched inference `model(x.repeat(2N, ...))`",
        }[self.kind]


def contenders(sizes: Sizes) -> List[Contender]:
    """Every row of a section, in table order."""
    rows = [Contender("normal", b) for b in sizes.normal_batches]
    rows += [Contender("lowrank", b) for b in sizes.lowrank_batches]
    if sizes.baselines:
        rows += [Contender("torchopt"), Contender("torcheggroll")]
    return rows + [Contender("inference")]


def missing(contender: Contender) -> Optional[str]:
    """Why a contender cannot run here (an optional package is missing), or None."""
    if contender.kind == "torchopt" and torchopt is None:
        return TORCHOPT_MISSING
    if contender.kind == "torcheggroll" and torcheggroll is None:
        return EGGROLL_MISSING
    return None


def evaluations(contender: Contender, num_samples: int) -> str:
    """Evaluations per step, and per call of the function where that is batched."""
    if contender.kind == "inference":
        return f"{2 * num_samples} members, 1 forward"
    if contender.kind == "torcheggroll":
        return f"{2 * num_samples}, 1 vmapped call"
    total = f"{2 * num_samples + 1}"
    if contender.batch_size is None:
        return total + ", 1 per call"
    per_call = max(1, contender.batch_size // 2) * 2
    return total + f", ≤ {min(per_call, 2 * num_samples)} per call"


def make_step(contender: Contender, model: Model, num_samples: int) -> Step:
    """A callable that runs one step of ``contender`` on ``model`` (device synchronized)."""
    problem = model.problem
    device = problem.x.device
    if contender.kind in ("normal", "lowrank"):
        dist = Normal() if contender.kind == "normal" else LowRank(1)
        decorate = zo_kernels.zero_order(
            dist, method=METHOD, argnums=0, num_samples=num_samples, sigma=SIGMA, batch_size=contender.batch_size
        )
        return harness.grad_step(problem, decorate(problem.loss))
    if contender.kind == "torchopt":
        assert torchopt is not None
        decorate = torchopt_zero_order(torchopt, METHOD, num_samples, SIGMA, device)
        return harness.grad_step(problem, decorate(problem.loss))
    if contender.kind == "torcheggroll":
        assert torcheggroll is not None
        es_step = torcheggroll_step(
            torcheggroll, model.module, problem.x, logits_loss, problem.y, num_samples=num_samples, sigma=SIGMA, lr=LR
        )

        def eggroll_step() -> None:
            es_step()
            harness.sync(device)

        return eggroll_step
    if contender.kind == "inference":
        x = problem.x
        population = x.repeat(2 * num_samples, *([1] * (x.ndim - 1)))

        def inference() -> None:
            with torch.no_grad():
                model.module(population)
            harness.sync(device)

        return inference
    raise ValueError(f"unknown contender {contender.kind!r}")


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One contender's result: seconds per step, or why there is none; warnings of its first step."""

    contender: Contender
    seconds: Optional[float] = None
    faults: Optional[int] = None  # minor page faults of this process during one step (fresh memory touched)
    error: str = ""
    warned: List[str] = field(default_factory=list)


def first_step(step: Step) -> List[str]:
    """Run ``step`` once (the warm-up), returning the distinct warnings it raised (vmap fallbacks, materializing)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    seen: List[str] = []
    for w in caught:
        text = str(w.message).split(". ")[0].split("\n")[0][:140]
        if text not in seen:
            seen.append(text)
    return seen


def page_faults(step: Step) -> int:
    """Minor page faults of this process during one ``step``: pages of fresh memory the kernel mapped and zeroed.

    glibc serves large blocks by ``mmap`` and returns them on ``free``, so a step that allocates big
    temporaries faults every page of them in again each time; on the CPU that is part of its time.
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def measure(contender: Contender, model: Model, sizes: Sizes, budget_s: float) -> Measured:
    """Median seconds of one step of ``contender`` (``harness.time_call``), its gradients checked; failures recorded."""
    result = Measured(contender)
    why = missing(contender)
    if why is not None:
        result.error = why
        return result
    device = model.problem.x.device
    try:
        step = make_step(contender, model, sizes.num_samples)
        result.warned = first_step(step)
        result.seconds = harness.time_call(step, device, budget_s)
        result.faults = page_faults(step)
        if contender.kind in ("normal", "lowrank", "torchopt"):
            harness.check_grads(model.problem, contender.label)
    except Exception as exc:  # one failing contender never stops the others
        result.error = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    finally:
        for p in model.problem.params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def best(results: Sequence[Measured], kind: str, batched_only: bool = False) -> Optional[Measured]:
    """The fastest measured contender of ``kind`` (only those with a batch_size where ``batched_only``)."""
    pool = [r for r in results if r.contender.kind == kind and r.seconds is not None]
    if batched_only:
        pool = [r for r in pool if r.contender.batch_size is not None]
    return min(pool, key=lambda r: r.seconds or 0.0, default=None)


def profile_step(step: Step, device: torch.device, top: int = PROFILE_TOP) -> Tuple[List[List[str]], float]:
    """The ``top`` (op, input shapes) pairs by self time of one ``step`` (after a warm-up), and the total self seconds.

    Shapes are those the op saw: inside vmap mostly one member's (logical) shapes, the batch dimension hidden.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    runs = []
    for _ in range(PROFILE_RUNS):  # the quickest of a few: one step's time varies with the page faults it takes
        with profile(activities=activities, record_shapes=True) as prof:
            step()
        runs.append(list(prof.key_averages(group_by_input_shape=True)))

    def self_us(evt: Any) -> float:
        if cuda:
            return float(getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0))
        return float(evt.self_cpu_time_total)

    def shapes(evt: Any) -> str:
        text = str([list(s) if isinstance(s, (list, tuple)) else s for s in (evt.input_shapes or [])])
        text = text.replace(" ", "")
        return text if len(text) <= 70 else text[:67] + "..."

    events = min(runs, key=lambda evs: sum(self_us(e) for e in evs))
    total = sum(self_us(e) for e in events) or 1.0
    rows = [
        [e.key, shapes(e), f"{self_us(e) / 1e3:,.1f} ms", f"{self_us(e) / total:.1%}", f"{e.count:,}"]
        for e in sorted(events, key=self_us, reverse=True)[:top]
    ]
    return rows, total * 1e-6


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One target: what is compared, the measured ratio, the threshold, and whether it is met."""

    what: str
    measured: str
    required: str
    met: str


@dataclass
class SectionResult:
    """Everything measured in one section."""

    key: str
    title: str
    model_name: str
    numel: int
    sizes: Sizes
    device: torch.device
    results: List[Measured] = field(default_factory=list)
    targets: List[Target] = field(default_factory=list)
    profile: List[List[str]] = field(default_factory=list)
    profile_of: str = ""
    note: str = ""


def ratio_target(what: str, num: Optional[Measured], den: Optional[Measured], low: float, why_not: str) -> Target:
    """``num.seconds / den.seconds >= low`` (a speed-up of ``den`` over ``num``), or not checked with a reason."""
    if num is None or den is None or num.seconds is None or den.seconds is None:
        return Target(what, "–", f"≥ {low:g}x", f"not checked ({why_not})")
    ratio = num.seconds / den.seconds
    return Target(what, fmt_ratio(ratio), f"≥ {low:g}x", "met" if ratio >= low else "NOT met")


def cpu_targets(results: Sequence[Measured]) -> List[Target]:
    """LowRank best vs Normal best (≥ 2.5x), vs torcheggroll (≥ 4x), LowRank step / batched inference (≤ 1.0x)."""
    lowrank, normal = best(results, "lowrank"), best(results, "normal")
    eggroll = best(results, "torcheggroll")
    inference = best(results, "inference")
    targets = [
        ratio_target("LowRank(1) best vs Normal() best (speed-up)", normal, lowrank, 2.5, "a row failed"),
        ratio_target("LowRank(1) best vs torcheggroll (speed-up)", eggroll, lowrank, 4.0,
                     EGGROLL_MISSING if torcheggroll is None else "a row failed"),
    ]  # fmt: skip
    if lowrank is None or inference is None or lowrank.seconds is None or inference.seconds is None:
        targets.append(Target("LowRank(1) step time / batched inference", "–", "≤ 1.00x", "not checked (a row failed)"))
    else:
        ratio = lowrank.seconds / inference.seconds
        met = "met" if ratio <= 1.0 else "NOT met"
        targets.append(Target("LowRank(1) step time / batched inference", fmt_ratio(ratio), "≤ 1.00x", met))
    return targets


def gpu_targets(results: Sequence[Measured]) -> List[Target]:
    """LowRank batched ≥ 10x faster than Normal batched; ≥ 90% of batched inference's throughput."""
    lowrank, normal = best(results, "lowrank", True), best(results, "normal", True)
    inference = best(results, "inference")
    targets = [ratio_target("LowRank(1) batched vs Normal() batched (speed-up)", normal, lowrank, 10.0, "a row failed")]
    what = "LowRank(1) throughput / batched inference throughput"
    if lowrank is None or inference is None or lowrank.seconds is None or inference.seconds is None:
        targets.append(Target(what, "–", "≥ 90%", "not checked (a row failed)"))
    else:
        share = inference.seconds / lowrank.seconds
        targets.append(Target(what, f"{share:.0%}", "≥ 90%", "met" if share >= 0.9 else "NOT met"))
    return targets


def run_section(key: str, cfg: Config, progress: harness.Progress) -> SectionResult:
    """Build the section's model, measure every contender, check the targets and profile one LowRank step."""
    sizes = cfg.sizes[key]
    gpu_here = key == "gpu" and not cfg.gpu_dry_run
    device = torch.device("cuda") if gpu_here else torch.device("cpu")
    model = mlp_model(sizes.model, device) if key == "mlp" else gpt_model(sizes.model, device)
    title = {"mlp": "1. CPU: MLP", "gpt": "2. CPU: GPT-style model", "gpu": "3. GPU: GPT-style model"}[key]
    if key == "gpu" and cfg.gpu_dry_run:
        title += " (DRY RUN on the CPU, tiny sizes: the code path only, numbers meaningless)"
    res = SectionResult(key, title, model.name, model.numel, sizes, device)
    for contender in contenders(sizes):
        progress.show(f"{key}: {contender.label} ({model.numel:,} params, N={sizes.num_samples})")
        measured = measure(contender, model, sizes, cfg.budget_s)
        res.results.append(measured)
        shown = fmt_time(measured.seconds) if measured.seconds is not None else measured.error
        tqdm_write(f"lowrank.py: {key}: {contender.label}: {shown}")
        progress.advance()
    res.targets = gpu_targets(res.results) if key == "gpu" else cpu_targets(res.results)
    top = best(res.results, "lowrank", batched_only=True)
    progress.show(f"{key}: profile of one LowRank(1) step")
    if top is not None:
        try:
            res.profile, seconds = profile_step(make_step(top.contender, model, sizes.num_samples), device)
            res.profile_of = (
                f"{top.contender.label}, one step ({fmt_time(seconds)} of profiled self time with the profiler's "
                f"overhead; {fmt_time(top.seconds or 0.0)} timed)"
            )
        except Exception as exc:
            res.profile_of = f"profile FAILED: {type(exc).__name__}: {exc}"[:160]
    progress.advance()
    if device.type == "cuda":
        res.note = (f"float32 parameters and activations; `torch.backends.cuda.matmul.allow_tf32` = "
                    f"{torch.backends.cuda.matmul.allow_tf32}.")  # fmt: skip
    return res


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

TABLE_NOTE = (
    "*vs LowRank(1) best* = this row's time / the best batched LowRank(1) time (> 1: LowRank is faster). "
    "*page faults / step*: minor page faults of the process during one more step (`getrusage`), each a 4 KiB page "
    "of a fresh large allocation that the kernel maps and zeroes (glibc hands blocks above its mmap threshold back "
    "to the system on `free`): CPU time inside the step that varies from run to run. zo_kernels and TorchOpt rows: "
    "`zero_order` + `.backward()`, f(θ) returned and every `.grad` written; torcheggroll: one `TorchEggrollES.step` "
    "(noise, vmapped evaluation of its 2N members, update); inference: one forward of the 2N members' inputs under "
    "`no_grad`."
)
COLUMNS = ("contender", "evaluations per step", "time per step", "vs LowRank(1) best", "page faults / step", "note")


def section_lines(res: SectionResult) -> List[str]:
    """A section's heading, problem line, table of contenders, targets and profile."""
    num = res.sizes.num_samples
    lines = ["", f"## {res.title}", ""]
    lines += [f"{res.model_name}; {res.numel:,} parameters on {res.device.type}; N = {num} ({2 * num} members), "
              f"{METHOD}, sigma = {SIGMA:g}.", ""]  # fmt: skip
    ref = best(res.results, "lowrank", batched_only=True)
    best_of = {kind: best(res.results, kind) for kind in ("normal", "lowrank")}
    rows = []
    for r in res.results:
        c = r.contender
        notes = []
        if best_of.get(c.kind) is r and sum(x.contender.kind == c.kind for x in res.results) > 1:
            notes.append(f"best {'Normal()' if c.kind == 'normal' else 'LowRank(1)'}")
        if r.warned:
            notes.append("warned: " + "; ".join(r.warned))
        if r.seconds is None:
            time_cell, vs = r.error, ""
        else:
            time_cell = fmt_time(r.seconds)
            vs = fmt_ratio(r.seconds / ref.seconds) if ref is not None and ref.seconds else ""
        faults = f"{r.faults:,}" if r.faults is not None else ""
        rows.append([c.label, evaluations(c, num), time_cell, vs, faults, "; ".join(notes)])
    lines += harness.table(COLUMNS, rows)
    lines += ["", TABLE_NOTE, ""]
    lines += [f"### Targets [{res.key}]", ""]
    lines += harness.rows_table(("target", "measured", "required", "met"), res.targets)
    lines += ["", f"### Where a LowRank(1) step's time goes [{res.key}]", ""]
    if res.profile:
        lines += [f"`torch.profiler`, {res.profile_of}; the top {len(res.profile)} ops by self "
                  f"{'CUDA' if res.device.type == 'cuda' else 'CPU'} time, per op and input shapes (inside vmap most "
                  "ops show one member's shapes, the batch dimension hidden; ops a batching rule issues show the "
                  "batched ones, e.g. `aten::bmm`):", ""]  # fmt: skip
        lines += harness.table(("op", "input shapes", "self time", "share of self time", "calls"), res.profile)
        lines += [
            "",
            "`_ZeroOrderFunction` / `_ZeroOrderFunctionBackward` are zo_kernels' autograd function (f(θ) "
            "forward; the 2N perturbed evaluations and the gradient in its backward): their self time is the "
            "Python and native-kernel work that is not an aten op (noise generation, plan, bookkeeping).",
        ]
    else:
        lines += [res.profile_of or "not profiled (no LowRank(1) batched row was measured)"]
    if res.note:
        lines += ["", res.note]
    return lines


def tree_line() -> str:
    """The commit measured and how many files of ``zo_kernels/`` differ from it (others may be editing the tree)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=harness.ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "zo_kernels")
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", ""
    if not commit:
        return "unknown (no git)"
    count = len([line for line in changed.splitlines() if line.strip()])
    return f"commit {commit}; files of zo_kernels/ differing from it: {count}"


def device_line(device: torch.device) -> str:
    """The device in words."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{harness.cpu_model()}, {harness.THREADS} threads of {os.cpu_count()} CPUs"


def header_lines(cfg: Config, sections: Sequence[SectionResult], load: str, skipped: str, tree: str) -> List[str]:
    """The report's header (``harness.header``)."""
    used = sorted({r.device.type for r in sections}) or ["cpu"]
    extra = (f"{version_of(torcheggroll, 'torcheggroll', EGGROLL_MISSING)}, "
             f"{version_of(transformers, 'transformers', TRANSFORMERS_MISSING)}, ")  # fmt: skip
    fields = [("date", harness.now())]
    fields += [(f"device [{d}]", device_line(torch.device(d))) for d in used]
    fields += [
        ("backend", "zo_kernels' default (best available per device); CPU: " + harness.choose_backend()[1]),
        ("versions", harness.versions(torchopt, extra=extra)),
        ("tree", tree),
        ("threads", harness.threads_line()),
        ("", load),
        ("mode", "quick (smoke run: tiny sizes, numbers not meaningful)" if cfg.quick else "full"),
        ("timing", harness.timing_note(cfg.budget_s)),
    ]
    if skipped:
        fields.append(("", skipped))
    return harness.header("zo_kernels LowRank(1) benchmark (`bench/lowrank.py`)", fields)


def summary_lines(sections: Sequence[SectionResult]) -> List[str]:
    """Every target of the run in one table."""
    rows = [[s.key, t.what, t.measured, t.required, t.met] for s in sections for t in s.targets]
    return ["", "## Targets", ""] + harness.table(("section", "target", "measured", "required", "met"), rows)


def default_out(sections: Sequence[str], quick: bool) -> Path:
    """``bench/results/lowrank-cpu.md``, ``-cuda`` where the GPU section runs, ``-quick`` for a smoke run."""
    tag = "cuda" if "gpu" in sections and torch.cuda.is_available() else "cpu"
    return harness.ROOT / "bench" / "results" / f"lowrank-{tag}{'-quick' if quick else ''}.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure the chosen sections, print the report and write it to ``--out``."""
    parser = argparse.ArgumentParser(description="LowRank(1) against Normal, TorchOpt, torcheggroll and inference.")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a short time budget per point")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=None, help="report file (default bench/results/lowrank-cpu.md)")
    parser.add_argument("--gpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # the GPU code on the CPU
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        parser.error(f"unknown section(s) {unknown} (choose from {', '.join(SECTIONS)})")
    cfg = Config.make(args.quick, args.gpu_dry_run)

    torch.set_num_threads(harness.THREADS)
    skipped = ""
    runnable = list(wanted)
    if "gpu" in runnable and not (torch.cuda.is_available() or cfg.gpu_dry_run):
        runnable.remove("gpu")
        skipped = "GPU section (3.) not run: torch.cuda.is_available() is False on this machine"
    out = args.out or default_out(runnable, cfg.quick)
    progress = harness.Progress(sum(len(contenders(cfg.sizes[k])) + 1 for k in runnable))
    tree = tree_line()  # before measuring: what was imported, whatever lands in the tree during the run
    run = harness.Run()
    sections: List[SectionResult] = []
    for key in runnable:
        sections.append(run_section(key, cfg, progress))
    progress.close()

    lines = header_lines(cfg, sections, run.before, skipped, tree)
    for res in sections:
        lines += section_lines(res)
    lines += summary_lines(sections)
    lines += ["", run.footer()]
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"lowrank.py: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
