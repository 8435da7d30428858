"""The three perturbation modes side by side: peak memory over inference and step time ('copy', 'inplace', 'on_use').

    python bench/memory.py [--quick] [--out bench/results/memory-cpu.md]   # about 5 minutes on 2 CPUs
    python bench/memory.py --sections tinyllama --out bench/results/memory-tinyllama.md   # on demand, ~10 minutes
    python bench/memory.py --sections gpt100m --out $OUT/memory-gpu.md   # on a GPU (bench/gpu_all.sh)

One MeZO step (``estimate(..., perturb=mode)`` + ``ZOSGD.step``; antithetic, N = 16, sigma = 1e-3) of (a) a stack
of 16 ``nn.Linear(512, 512)`` (16 MiB in float32), (b) an HF GPT-2 and (c) an HF Llama built from configs, in
float32 and bfloat16 (``'inplace'`` refuses half precision). Memory: each (model, dtype, mode) in a fresh process
(``harness.memory_worker``: the resident set's growth during one step; on a GPU ``max_memory_allocated``), minus
inference's (one forward under ``no_grad``), against the target ``'on_use'`` <= the largest parameter tensor
(+5%). Time: ``harness.time_call`` per step, target ``'on_use'`` <= 1.1x ``'copy'`` and faster than ``'inplace'``.
``tinyllama``: TinyLlama-1.1B's configuration in bfloat16 (2.2 GB), one step of N = 1 per mode (a forward of 64
tokens takes ~15 s on 2 CPUs); the step times are those of the measured step.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

import harness
import torch

import zo_kernels
from zo_kernels.optim import ZOSGD

MODES = ("copy", "inplace", "on_use")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
N, SIGMA = 16, 1e-3
CONFIGS = {  # transformers configs: small enough for a CPU, the shapes of the real ones
    "gpt2": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128),
    "llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192),
    "gpt100m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),  # GPT-2 small, 124M
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
QUICK = {"gpt2": dict(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=32)}


def build(model: str, dtype: str, device: torch.device, quick: bool = False) -> Tuple[Any, List[torch.Tensor], Any]:
    """``(loss_fn, params, batch)``: the model's loss as a function of the parameters it holds (MeZO's style)."""
    torch.manual_seed(0)
    if model == "stack":
        width = 64 if quick else 512
        net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(16)])
        for layer in net:  # scale-preserving, so that sigma = 1e-3 moves the loss of 16 layers
            torch.nn.init.normal_(layer.weight, std=width**-0.5)
        batch = torch.randn(64, width)

        def loss(ps: Any, x: torch.Tensor) -> torch.Tensor:
            return net(x.to(ps[0].dtype)).float().pow(2).mean()
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        config = QUICK[model] if quick and model in QUICK else CONFIGS[model]
        kind = (transformers.GPT2Config, transformers.GPT2LMHeadModel) if model.startswith("gpt") else (
            transformers.LlamaConfig, transformers.LlamaForCausalLM)  # fmt: skip
        net = kind[1](kind[0](**config, attn_implementation="eager"))
        batch = torch.randint(net.config.vocab_size, (1 if model == "tinyllama" else 4, 16 if quick else 64))

        def loss(ps: Any, ids: torch.Tensor) -> torch.Tensor:
            return net(input_ids=ids, labels=ids).loss.float()

    net = net.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    return loss, list(net.parameters()), batch.to(device)


def step_case(model: str, dtype: str, mode: str, quick: bool, device: torch.device) -> harness.Built:
    """A memory job's ``build``: one MeZO step in ``mode`` ('inference': one forward)."""
    loss, params, batch = build(model, dtype, device, quick)
    optimizer, samples = ZOSGD(params, lr=1e-6), 1 if model == "tinyllama" else N

    def step() -> None:
        with torch.no_grad():
            if mode == "inference":
                loss(params, batch)
            else:
                sg = zo_kernels.estimate(loss, params, batch, method="antithetic", num_samples=samples, sigma=SIGMA,
                                         perturb=mode)  # fmt: skip
                optimizer.step(sg)
        harness.sync(device)

    return step, params


def cuda_peak(step: Any, params: List[torch.Tensor]) -> Dict[str, Any]:
    """``{"delta": bytes}``: the growth of ``max_memory_allocated`` during one step, after a warm-up step."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return {"delta": torch.cuda.max_memory_allocated() - base}


def largest_bytes(params: List[torch.Tensor]) -> int:
    return max(p.numel() * p.element_size() for p in params)


def section(model: str, device: torch.device, quick: bool) -> List[str]:
    """The memory and time table of one model on ``device``, both dtypes."""
    rows, lines = [], []
    for dtype in DTYPES:
        _, params, _ = build(model, dtype, device, quick)
        largest, total = largest_bytes(params), sum(p.numel() * p.element_size() for p in params)
        modes = [m for m in ("inference", *MODES) if not (m == "inplace" and dtype != "float32")]
        jobs = [harness.MemoryJob(step_case, dict(model=model, dtype=dtype, mode=m, quick=quick), str(device),
                                  harness.THREADS, 0, name=f"{model} {dtype} {m}") for m in modes]  # fmt: skip
        if device.type == "cuda":  # the allocator's own peak: exact in this process
            mem = {m: cuda_peak(*step_case(model, dtype, m, quick, device)) for m in modes}
        else:
            at_once = harness.memory_parallelism() if quick else 1  # a quick run's numbers mean nothing anyway
            mem = dict(zip(modes, harness.run_memory_jobs(jobs, at_once, 3600)))
        base = mem["inference"].get("delta")
        times: Dict[str, float] = {}
        if model != "tinyllama":
            for m in [m for m in modes if m != "inference"]:
                step, _ = step_case(model, dtype, m, quick, device)
                times[m] = harness.time_call(step, device, 0.1 if quick else 6.0)
        else:
            times = {m: r["seconds"] for m, r in mem.items() if "seconds" in r and m != "inference"}
        for m in MODES:
            r = mem.get(m, {"error": "refused: half precision drifts in place"})
            over = r["delta"] - base if "delta" in r and base is not None else None
            target = ""
            if m == "on_use" and over is not None:
                target = harness.verdict([("memory", over <= 1.05 * largest)])
                if "copy" in times and "on_use" in times:
                    faster = "inplace" not in times or times["on_use"] < times["inplace"]
                    target += " / " + harness.verdict([("time", times["on_use"] <= 1.1 * times["copy"] and faster)])
            step = harness.fmt_ms(times[m]) if m in times else ""
            ratio = harness.fmt_ratio(times[m] / times["copy"]) if m in times and "copy" in times else ""
            over_text = r.get("error", "")[:60] or harness.fmt_mem(over)
            rows.append([model, dtype, m, harness.fmt_mem(total), harness.fmt_mem(largest), over_text, step, ratio,
                         target])  # fmt: skip
    columns = ["model", "dtype", "mode", "params", "largest tensor", "peak over inference", "step", "vs copy",
               "target (mem ≤ largest +5% / time ≤ 1.1x copy, < inplace)"]  # fmt: skip
    lines += harness.table(columns, rows) + [""]
    return lines


def main() -> int:
    p = harness.parser(__doc__)
    p.add_argument("--sections", nargs="*", default=["stack", "gpt2", "llama"],
                   help="stack, gpt2, llama, gpt100m, tinyllama")  # fmt: skip
    args = p.parse_args()
    run = harness.Run()
    device = harness.devices()[-1]  # the GPU where there is one
    models = ["stack"] if args.quick else args.sections
    missing = harness.missing("transformers")
    lines = harness.header(f"zo_kernels perturbation modes: memory and time [{harness.device_name(device)}]",
                           run.fields("transformers") + [("timing", harness.timing_note(6.0)),
                           ("step", f"estimate(antithetic, N={N} (tinyllama: 1), sigma={SIGMA:g}, perturb=mode) + "
                            "ZOSGD.step; memory: one fresh process per row (bench/README.md)")])  # fmt: skip
    progress = harness.Progress(len(models))
    for model in models:
        progress.show(model)
        if model != "stack" and missing:
            lines += [f"{model}: {missing}", ""]
        else:
            lines += section(model, device, args.quick)
        progress.advance(1)
    progress.close()
    lines.append(run.footer())
    harness.write(args.out, lines, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
