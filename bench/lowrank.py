"""The low-rank section of ``make bench``: ``LowRank(1)`` batched vs Normal noise, TorchOpt, torcheggroll, inference.

    python bench/lowrank.py [--quick] [--sections mlp,gpt,gpu] [--out FILE]

One antithetic step (``zero_order(...)`` + ``.backward()``: 2N+1 evaluations) per contender, side by side:
(1) mlp, CPU: the 1024 → 256 → 10 tanh MLP, batch 256, cross-entropy, N = 100; (2) gpt, CPU: an HF
``GPT2LMHeadModel`` from a config (eager attention; ``TinyGPT`` of python/mezo_finetune.py without
transformers), N = 32; (3) gpu (CUDA only): GPT-2 small, 256 members. Contenders: ``Normal()`` and
``LowRank(1)`` (loop and ``batch_size`` sweeps), TorchOpt, torcheggroll ``TorchEggrollES(rank=1)``, and batched
inference of the population's inputs. Targets, each met / NOT met / not checked.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import harness
import torch
import torch.nn.functional as F
from harness import fmt_ratio, fmt_time

import zo_kernels
from zo_kernels.distributions import LowRank, Normal

torchopt, torcheggroll, transformers = map(harness.optional, ("torchopt", "torcheggroll", "transformers"))
METHOD, SIGMA, LR = "antithetic", 0.01, 1e-7  # LR: torcheggroll's update, small so timing steps barely move it
SECTIONS = ("mlp", "gpt", "gpu")
TITLES = {"mlp": "1. CPU: MLP", "gpt": "2. CPU: GPT-style model", "gpu": "3. GPU: GPT-style model"}


@dataclass(frozen=True)
class Sizes:
    """One section: N, the batch sizes of Normal() and LowRank(1) (None: the loop), the model, the baseline rows."""

    num_samples: int
    normal_batches: Tuple[Optional[int], ...]
    lowrank_batches: Tuple[Optional[int], ...]
    model: Dict[str, int]
    baselines: bool  # TorchOpt and torcheggroll (not on the GPU: torcheggroll holds 2N copies of the weights)


QUICK = dict(
    mlp=Sizes(4, (None, 4), (8, None), dict(d_in=64, hidden=32, classes=10, batch=32), True),
    gpt=Sizes(4, (None, 4), (8,), dict(layers=2, d_model=32, heads=2, vocab=128, seq=16, batch=2), True),
    gpu=Sizes(8, (8,), (16,), dict(layers=2, d_model=128, heads=2, vocab=1024, seq=32, batch=1), False),
)
FULL = dict(
    mlp=Sizes(100, (None, 8, 20, 40), (26, 34, 50, 100, 200, None), dict(d_in=1024, hidden=256, classes=10,
                                                                         batch=256), True),  # fmt: skip
    gpt=Sizes(32, (None, 8, 16), (16, 32, 64, None), dict(layers=4, d_model=256, heads=4, vocab=4096, seq=64,
                                                          batch=2), True),  # fmt: skip
    gpu=Sizes(128, (32,), (256,), dict(layers=12, d_model=768, heads=12, vocab=50257, seq=128, batch=1), False),
)


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


def make_model(key: str, sizes: Dict[str, int], device: torch.device) -> Tuple[torch.nn.Module, harness.Problem]:
    """The section's network ``module(x) -> logits`` and the problem over copies of its parameters (seeded)."""
    torch.manual_seed(0)
    if key == "mlp":
        d_in, hidden, classes, batch = (sizes[k] for k in ("d_in", "hidden", "classes", "batch"))
        module = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
        module, x, y = module.to(device), torch.randn(batch, d_in, device=device), torch.randint(classes, (batch,))
        name, y = f"MLP {d_in}→{hidden}→{classes} tanh, batch {batch}, cross-entropy", y.to(device)
    else:
        vocab, seq, batch, layers, width = (sizes[k] for k in ("vocab", "seq", "batch", "layers", "d_model"))
        tokens = torch.randint(vocab, (batch, seq + 1), device=device)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if transformers is not None:
            config = transformers.GPT2Config(
                n_layer=layers, n_embd=width, n_head=sizes["heads"], vocab_size=vocab, n_positions=seq,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                attn_implementation="eager",
            )  # fmt: skip
            with torch.device(device):
                module = LogitsOnly(transformers.GPT2LMHeadModel(config))
            kind = "HF GPT2LMHeadModel (eager attention, tied LM head)"
        else:
            gpt = dict(vocab=vocab, seq_len=seq, d_model=width, heads=sizes["heads"], layers=layers, ff=4 * width,
                       batch=batch)  # fmt: skip
            module = harness.tiny_gpt(gpt, device)[0]
            kind = f"TinyGPT of python/mezo_finetune.py ({harness.missing('transformers')})"
        numel = sum(p.numel() for p in module.parameters())
        name = (f"{kind}: {layers} layers, d {width}, {sizes['heads']} heads, vocab {vocab}; {numel / 1e6:.2f}M "
                f"parameters; batch {batch} x {seq} tokens, next-token cross-entropy")  # fmt: skip
    module.eval()
    names = [n for n, _ in module.named_parameters()]

    def loss(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits_loss(torch.func.functional_call(module, dict(zip(names, params)), (x,)), y)

    return module, harness.Problem(name, loss, harness.leaf_params(module), x, y)


@dataclass(frozen=True)
class Contender:
    """One row: a kind (``normal``, ``lowrank``, ``torchopt``, ``torcheggroll``, ``inference``) and its batch size."""

    kind: str
    batch_size: Optional[int] = None

    @property
    def label(self) -> str:
        """The row's name in the table."""
        if self.kind in ("normal", "lowrank"):
            how = "loop" if self.batch_size is None else f"batch_size={self.batch_size}"
            return f"zo_kernels {'Normal()' if self.kind == 'normal' else 'LowRank(1)'}, {how}"
        return {"torchopt": "TorchOpt 0.7.3 `zero_order` (Normal)",
                "torcheggroll": "torcheggroll `TorchEggrollES(rank=1)` step",
                "inference": "batched inference `model(x.repeat(2N, ...))`"}[self.kind]  # fmt: skip

    def evaluations(self, num: int) -> str:
        """Evaluations per step, and per call of the function where that is batched."""
        if self.kind in ("inference", "torcheggroll"):
            return f"{2 * num} members, 1 forward" if self.kind == "inference" else f"{2 * num}, 1 vmapped call"
        per_call = 1 if self.batch_size is None else min(max(1, self.batch_size // 2) * 2, 2 * num)
        return f"{2 * num + 1}, {'≤ ' if self.batch_size else ''}{per_call} per call"


def contenders(sizes: Sizes) -> List[Contender]:
    """Every row of a section, in table order."""
    rows = [Contender("normal", b) for b in sizes.normal_batches]
    rows += [Contender("lowrank", b) for b in sizes.lowrank_batches]
    if sizes.baselines:
        rows += [Contender("torchopt"), Contender("torcheggroll")]
    return rows + [Contender("inference")]


def make_step(contender: Contender, module: torch.nn.Module, problem: harness.Problem, num: int) -> Any:
    """A callable that runs one step of ``contender`` (device synchronized)."""
    device = problem.x.device
    if contender.kind in ("normal", "lowrank", "torchopt"):
        if contender.kind == "torchopt":
            decorate = harness.torchopt_zero_order(torchopt, METHOD, num, SIGMA, device)
        else:
            decorate = zo_kernels.zero_order(Normal() if contender.kind == "normal" else LowRank(1), method=METHOD,
                                             argnums=0, num_samples=num, sigma=SIGMA, batch_size=contender.batch_size)
        return harness.grad_step(problem, decorate(problem.loss))
    if contender.kind == "torcheggroll":
        run = harness.torcheggroll_step(torcheggroll, module, problem.x, logits_loss, problem.y, num_samples=num,
                                        sigma=SIGMA, lr=LR)  # fmt: skip
    else:
        population = problem.x.repeat(2 * num, *([1] * (problem.x.ndim - 1)))
        run = torch.no_grad()(lambda: module(population))

    def step() -> None:
        run()
        harness.sync(device)

    return step


@dataclass
class Measured:
    """One contender's result: seconds per step (or why there is none), the warnings of its first step."""

    contender: Contender
    seconds: Optional[float] = None
    error: str = ""
    warned: List[str] = field(default_factory=list)


def measure(contender: Contender, module: torch.nn.Module, problem: harness.Problem, num: int,
            budget_s: float) -> Measured:  # fmt: skip
    """A first step (its distinct warnings kept), then the median step time, gradients checked; failures recorded."""
    result = Measured(contender, error=harness.missing(contender.kind) or "")  # an optional package missing
    if result.error:
        return result
    try:
        step = make_step(contender, module, problem, num)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        for w in caught:  # vmap fallbacks, materializing
            if (text := str(w.message).split(". ")[0].split("\n")[0][:140]) not in result.warned:
                result.warned.append(text)
        result.seconds = harness.time_call(step, problem.x.device, budget_s)
        if contender.kind in ("normal", "lowrank", "torchopt"):
            harness.check_grads(problem, contender.label)
    except Exception as exc:  # one failing contender never stops the others
        result.error = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    finally:
        for p in problem.params:
            p.grad = None
        if problem.x.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def best(results: Sequence[Measured], kind: str, batched_only: bool = False) -> Optional[Measured]:
    """The fastest measured contender of ``kind`` (only those with a batch_size where ``batched_only``)."""
    pool = [r for r in results if r.contender.kind == kind and r.seconds is not None
            and (r.contender.batch_size is not None or not batched_only)]  # fmt: skip
    return min(pool, key=lambda r: r.seconds or 0.0, default=None)


def target(what: str, num: Optional[Measured], den: Optional[Measured], need: float, at_least: bool = True,
           percent: bool = False, why_not: str = "a row failed") -> List[str]:  # fmt: skip
    """``[what, measured, required, met]`` for ``num.seconds / den.seconds`` against ``need``."""
    required = f"{'≥' if at_least else '≤'} " + (f"{need:.0%}" if percent else f"{need:.2f}x" if not at_least
                                                  else f"{need:g}x")  # fmt: skip
    if num is None or den is None or num.seconds is None or den.seconds is None:
        return [what, "–", required, f"not checked ({why_not})"]
    ratio = num.seconds / den.seconds
    met = ratio >= need if at_least else ratio <= need
    return [what, f"{ratio:.0%}" if percent else fmt_ratio(ratio), required, "met" if met else "NOT met"]


def targets(key: str, results: Sequence[Measured]) -> List[List[str]]:
    """CPU: LowRank best ≥ 2.5x Normal best, ≥ 4x torcheggroll, ≤ 1.0x inference; GPU: ≥ 10x Normal batched, ≥ 90%
    of batched inference's throughput."""
    inference = best(results, "inference")
    if key == "gpu":
        lowrank = best(results, "lowrank", True)
        return [target("LowRank(1) batched vs Normal() batched (speed-up)", best(results, "normal", True), lowrank, 10),
                target("LowRank(1) throughput / batched inference throughput", inference, lowrank, 0.9,
                       percent=True)]  # fmt: skip
    lowrank, eggroll, why = best(results, "lowrank"), best(results, "torcheggroll"), harness.missing("torcheggroll")
    return [target("LowRank(1) best vs Normal() best (speed-up)", best(results, "normal"), lowrank, 2.5),
            target("LowRank(1) best vs torcheggroll (speed-up)", eggroll, lowrank, 4, why_not=why or "a row failed"),
            target("LowRank(1) step time / batched inference", lowrank, inference, 1.0, at_least=False)]  # fmt: skip


def run_section(key: str, sizes: Sizes, dry_run: bool, budget_s: float,
                progress: harness.Progress) -> Tuple[List[str], List[List[str]]]:  # fmt: skip
    """Measure a section's contenders and check its targets: the section's lines, and its targets."""
    device = torch.device("cuda" if key == "gpu" and not dry_run else "cpu")
    module, problem = make_model(key, sizes.model, device)
    num = sizes.num_samples
    title = TITLES[key] + (" (DRY RUN on the CPU, tiny sizes: the code path only, numbers meaningless)"
                           if key == "gpu" and dry_run else "")  # fmt: skip
    results = []
    for contender in contenders(sizes):
        progress.show(f"{key}: {contender.label} ({problem.numel:,} params, N={num})")
        results.append(r := measure(contender, module, problem, num, budget_s))
        progress.bar.write(f"lowrank.py: {key}: {contender.label}: {fmt_time(r.seconds) if r.seconds else r.error}",
                           file=sys.stderr)  # fmt: skip
        progress.advance()
    ref = best(results, "lowrank", batched_only=True)
    best_of = {kind: best(results, kind) for kind in ("normal", "lowrank")}
    rows = []
    for r in results:
        c = r.contender
        notes = []
        if best_of.get(c.kind) is r and sum(x.contender.kind == c.kind for x in results) > 1:
            notes.append(f"best {'Normal()' if c.kind == 'normal' else 'LowRank(1)'}")
        if r.warned:
            notes.append("warned: " + "; ".join(r.warned))
        vs = fmt_ratio(r.seconds / ref.seconds) if r.seconds is not None and ref is not None and ref.seconds else ""
        rows.append([c.label, c.evaluations(num), fmt_time(r.seconds) if r.seconds is not None else r.error, vs,
                     "; ".join(notes)])  # fmt: skip
    lines = ["", f"## {title}", "", f"{problem.name}; {problem.numel:,} parameters on {device.type}; N = {num} "
             f"({2 * num} members), {METHOD}, sigma = {SIGMA:g}.", ""]  # fmt: skip
    lines += harness.table(("contender", "evaluations per step", "time per step", "vs LowRank(1) best", "note"), rows)
    lines += ["", TABLE_NOTE, "", f"### Targets [{key}]", ""]
    section_targets = targets(key, results)
    lines += harness.table(("target", "measured", "required", "met"), section_targets)
    if device.type == "cuda":
        lines += ["", f"float32 parameters and activations; `torch.backends.cuda.matmul.allow_tf32` = "
                  f"{torch.backends.cuda.matmul.allow_tf32}."]  # fmt: skip
    return lines, [[key, *t] for t in section_targets]


TABLE_NOTE = (
    "*vs LowRank(1) best* = this row's time / the best batched LowRank(1) time (> 1: LowRank is faster). zo_kernels "
    "and TorchOpt rows: `zero_order` + `.backward()`, f(θ) returned and every `.grad` written; torcheggroll: one "
    "`TorchEggrollES.step` (noise, vmapped evaluation of its 2N members, update); inference: one forward of the 2N "
    "members' inputs under `no_grad`."
)


def tree_line() -> str:
    """The commit measured and how many files of ``zo_kernels/`` differ from it (others may be editing the tree)."""

    queries = (("rev-parse", "--short", "HEAD"), ("status", "--porcelain", "--", "zo_kernels"))
    try:
        commit, changed = (subprocess.run(["git", *q], cwd=harness.ROOT, capture_output=True, text=True, timeout=10)
                           .stdout.strip() for q in queries)
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", ""
    count = len([line for line in changed.splitlines() if line.strip()])
    return f"commit {commit}; files of zo_kernels/ differing from it: {count}" if commit else "unknown (no git)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure the chosen sections, print the report and write it to ``--out``."""
    parser = harness.parser(__doc__, "report file (default bench/results/lowrank-cpu.md, -cuda with a GPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS))
    parser.add_argument("--gpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # the GPU code on the CPU
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not wanted or set(wanted) - set(SECTIONS):
        parser.error(f"unknown section(s) {sorted(set(wanted) - set(SECTIONS))} (choose from {', '.join(SECTIONS)})")
    if args.gpu_dry_run and not args.quick:
        parser.error("--gpu-dry-run goes with --quick")
    sizes, budget_s = (QUICK, 0.05) if args.quick else (FULL, 3.0)
    skipped = ""
    if "gpu" in wanted and not (torch.cuda.is_available() or args.gpu_dry_run):
        wanted.remove("gpu")
        skipped = "GPU section (3.) not run: torch.cuda.is_available() is False on this machine"
    tag = "cuda" if "gpu" in wanted and torch.cuda.is_available() else "cpu"
    out = args.out or harness.ROOT / "bench" / "results" / f"lowrank-{tag}{'-quick' if args.quick else ''}.md"
    progress = harness.Progress(sum(len(contenders(sizes[k])) for k in wanted))
    tree = tree_line()  # before measuring: what was imported, whatever lands in the tree during the run
    run = harness.Run()
    sections = [run_section(key, sizes[key], args.gpu_dry_run, budget_s, progress) for key in wanted]
    progress.close()
    used = sorted({"cuda" if key == "gpu" and not args.gpu_dry_run else "cpu" for key in wanted}) or ["cpu"]
    fields = [(f"device [{d}]", harness.device_name(torch.device(d))) for d in used]
    fields += [("backend", "zo_kernels' default (best available per device); CPU: " + harness.choose_backend()[1]),
               ("tree", tree), *run.fields("torcheggroll", "transformers"),
               ("mode", "quick (smoke run: tiny sizes, numbers not meaningful)" if args.quick else "full"),
               ("timing", harness.timing_note(budget_s))] + ([("", skipped)] if skipped else [])  # fmt: skip
    lines = harness.header("zo_kernels LowRank(1) benchmark (`bench/lowrank.py`)", fields)
    lines += [line for section_lines, _ in sections for line in section_lines]
    summary = [row for _, section_targets in sections for row in section_targets]
    lines += ["", "## Targets", ""] + harness.table(("section", "target", "measured", "required", "met"), summary)
    harness.write(out, lines + ["", run.footer()], echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
