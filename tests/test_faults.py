"""Fault injection: the function raising at sample k loses nothing, in one process and over 2 gloo ranks.

After the failure the parameters are bit-identical to before (in place: restored within the
documented rounding bound), no ``.grad`` is written, and the error carries the sample index.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_distributed import ROOT, free_port

import zo_kernels
from zo_kernels import distributions

N = 8
#: in place, restoring theta + s z - s z rounds: at most one float32 rounding per update, 3 per antithetic sample
INPLACE_RTOL = N * 3 * 2.0**-24


class Boom(ValueError):
    """The injected failure: a ValueError, which is never mistaken for vmap being unable to run the function."""


def problem():
    g = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(5, generator=g)}
    x = torch.randn(9, 12, generator=g)

    def loss(p, x):
        return (x @ p["w"] + p["b"]).tanh().square().mean()

    return params, x, loss


def failing_at(loss, call):
    """``loss`` that raises ``Boom`` on its ``call``-th call (0 is the unperturbed forward)."""
    calls = []

    def fn(p, x):
        calls.append(1)
        if len(calls) == call + 1:
            raise Boom(f"injected failure on call {call}")
        return loss(p, x)

    return fn


PATHS = {
    # path: (decorator options, index of the call that evaluates sample k (antithetic: its +sigma z))
    "loop": (dict(), lambda k: 1 + 2 * k),
    "vmap": (dict(batch_size=4), lambda k: 1 + k // 2),  # 2 antithetic samples per vmapped call
    "inplace": (dict(inplace=True), lambda k: 1 + 2 * k),
    "on_use": (dict(perturb="on_use"), lambda k: 1 + 2 * k),
}


@pytest.mark.parametrize("k", [0, N // 2, N - 1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dist", [distributions.Normal(), distributions.LowRank(2)], ids=repr)
def test_function_raising_at_sample_k_loses_nothing(path, k, dist):
    params, x, loss = problem()
    options, call_of = PATHS[path]
    tree = {name: v.clone().requires_grad_() for name, v in params.items()}
    fn = zo_kernels.zero_order(dist, method="antithetic", num_samples=N, sigma=0.1, seed=3, **options)(
        failing_at(loss, call_of(k))
    )
    out = fn(tree, x)
    with pytest.raises(Boom) as info:
        out.backward()
    notes = " ".join(getattr(info.value, "__notes__", []))
    if sys.version_info >= (3, 11):
        if path == "vmap":
            first = (k // 2) * 2
            assert f"samples {first}..{first + 1} together under torch.func.vmap" in notes
        else:
            assert f"sample {k}," in notes
    for name, before in params.items():
        assert tree[name].grad is None
        if path == "inplace":
            torch.testing.assert_close(tree[name].detach(), before, rtol=INPLACE_RTOL, atol=1e-7)
        else:
            assert torch.equal(tree[name].detach(), before)
        if path == "on_use":
            assert tree[name]._version == 0  # never written, not even restored


@pytest.mark.parametrize("k", [0, N - 1], ids=["first", "last"])
def test_estimate_raising_at_sample_k_leaves_the_parameters(k):
    params, x, loss = problem()
    before = {name: v.clone() for name, v in params.items()}
    with pytest.raises(Boom):
        zo_kernels.estimate(failing_at(loss, 1 + 2 * k), params, x, method="antithetic", num_samples=N, sigma=0.1)
    assert all(torch.equal(params[name], before[name]) for name in params)


def test_a_later_call_after_a_failure_is_unaffected():
    params, x, loss = problem()
    kw = dict(method="antithetic", num_samples=N, sigma=0.1, seed=5)
    reference = {name: v.clone().requires_grad_() for name, v in params.items()}
    zo_kernels.zero_order(distributions.Normal(), **kw)(loss)(reference, x).backward()
    tree = {name: v.clone().requires_grad_() for name, v in params.items()}
    fn = zo_kernels.zero_order(distributions.Normal(), **kw)(failing_at(loss, 3))
    with pytest.raises(Boom):
        fn(tree, x).backward()
    fn(tree, x).backward()  # the counter has passed: this call succeeds
    assert all(torch.equal(tree[name].grad, reference[name].grad) for name in params)


# --------------------------------------------------------------------------------------------------
# Two gloo ranks: a rank whose function raises makes every rank raise at once, not hang.
# --------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import datetime, json, sys, time
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import zo_kernels
    from zo_kernels import distributions

    rank, port, out, mode, k = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    # "forward": rank 0 learns of rank 1's failure only from this timeout (the mechanism under test); otherwise
    # it is a hang guard, long enough that raising "at once" is never confused with waiting for it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=10 if mode == "forward" else 600))
    g = torch.Generator().manual_seed(0)
    params = {{"w": torch.randn(12, 5, generator=g), "b": torch.randn(5, generator=g)}}
    x = torch.randn(9, 12, generator=g)
    before = {{name: v.clone() for name, v in params.items()}}
    calls = []

    def loss(p, x):
        calls.append(1)
        # rank 1 owns samples 4..7 of 8; its calls: 0 = forward, then 1 + 2 * (sample - 4) for +sigma z
        if rank == 1 and mode == "sample" and len(calls) == 2 + 2 * (k - 4):
            raise ValueError("injected failure")
        if rank == 1 and mode == "forward" and len(calls) == 1:
            raise ValueError("injected failure in the forward pass")
        return (x @ p["w"] + p["b"]).tanh().square().mean()

    tree = {{name: v.clone().requires_grad_() for name, v in params.items()}}
    fn = zo_kernels.zero_order(distributions.Normal(), method="antithetic", num_samples=8, sigma=0.1, seed=1,
                               process_group=dist.group.WORLD)(loss)
    started = time.monotonic()
    result = {{"rank": rank}}
    try:
        fn(tree, x).backward()
        result["error"] = None
    except Exception as exc:
        result["error"] = type(exc).__name__ + ": " + str(exc) + " " + " ".join(getattr(exc, "__notes__", []))
    result["seconds"] = time.monotonic() - started
    result["unchanged"] = all(torch.equal(tree[n].detach(), before[n]) for n in params)
    result["grad_written"] = any(tree[n].grad is not None for n in params)
    with open(out + f".{{rank}}", "w") as f:
        json.dump(result, f)
    """
)


def run_two_ranks(tmp_path, mode, k=0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT))
    port, out = str(free_port()), str(tmp_path / "result")
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), port, out, mode, str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            p.kill()

    results = []
    for r in range(2):
        assert os.path.exists(f"{out}.{r}"), f"rank {r} wrote no result:\n{logs[r] if r < len(logs) else ''}"
        with open(f"{out}.{r}") as f:
            results.append(json.load(f))
    return results, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("k", [4, 7], ids=["first-of-rank-1", "last-of-rank-1"])
def test_a_rank_raising_at_sample_k_makes_both_ranks_raise_at_once(tmp_path, k):
    (r0, r1), _ = run_two_ranks(tmp_path, "sample", k)
    assert r1["error"].startswith("ValueError: injected failure")
    if sys.version_info >= (3, 11):
        assert f"sample {k}," in r1["error"]
    assert r0["error"].startswith("RuntimeError") and "rank(s) [1]" in r0["error"]
    for r in (r0, r1):
        assert r["unchanged"] and not r["grad_written"]
        assert r["seconds"] < 300.0  # the same collective tells rank 0: no wait for the 600 s timeout


@pytest.mark.slow
def test_a_rank_failing_before_the_estimate_leaves_the_other_waiting_only_until_the_timeout(tmp_path):
    # Rank 1 raises in the forward pass, so it never joins the estimate's collectives: rank 0 can
    # only learn of it from the process group's timeout (10 s here), and then raises.
    (r0, r1), _ = run_two_ranks(tmp_path, "forward")
    assert r1["error"].startswith("ValueError: injected failure in the forward pass")
    assert r0["error"] is not None and r0["seconds"] < 300.0
    for r in (r0, r1):
        assert r["unchanged"] and not r["grad_written"]
