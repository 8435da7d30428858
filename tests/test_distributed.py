"""process_group=: 2 gloo ranks on the loopback give the single-process gradient, bit for bit."""

import os
import socket
import sys
import textwrap

import pytest
import torch

import zo_kernels
from zo_kernels import distributions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

# The worker runs in fresh processes: the problem is rebuilt from fixed seeds on every rank.
WORKER = textwrap.dedent(
    """
    import datetime, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import zo_kernels
    from zo_kernels import distributions

    rank, world, port, out, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ["ZO_KERNELS_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    {problem}
    results = {{}}
    cases = [(n, None) for n in ("Normal", "Rademacher", "Sphere", "LowRank")] + [("Normal", "centered_ranks")]
    for method in ("naive", "forward", "antithetic"):
        for name, shaping in cases:
            tree = {{k: v.clone().requires_grad_() for k, v in params.items()}}
            torch.manual_seed(100 + rank)  # different RNG per rank: the seed must come from rank 0
            fn = zo_kernels.zero_order(getattr(distributions, name)(), method=method, num_samples=7, sigma=0.05,
                                       process_group=dist.group.WORLD, fitness_shaping=shaping)
            fn(loss)(tree, x).backward()
            sg = zo_kernels.estimate(loss, params, x, distribution=getattr(distributions, name)(), method=method,
                                     num_samples=7, sigma=0.05, seed=11, process_group=dist.group.WORLD,
                                     fitness_shaping=shaping)
            results[(method, name, shaping)] = ([tree[k].grad for k in tree], sg.weights)
    torch.save(results, out + f".{{rank}}")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    """
)

PROBLEM = """
g = torch.Generator().manual_seed(0)
params = {"w": torch.randn(20, 6, generator=g), "b": torch.randn(6, generator=g, dtype=torch.float64)}
x = torch.randn(5, 20, generator=g)
def loss(p, x):
    return ((x @ p["w"]).double() + p["b"]).tanh().square().mean()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_two_gloo_ranks_match_one_process(tmp_path, backend, monkeypatch):
    if zo_kernels.backends.available()[backend] != "available":
        pytest.skip(f"{backend}: {zo_kernels.backends.available()[backend]}")
    monkeypatch.setenv("ZO_KERNELS_BACKEND", backend)
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, problem=PROBLEM))
    port, out = str(free_port()), str(tmp_path / "result")
    env = {**os.environ, "ZO_KERNELS_BACKEND": backend}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", port, out, backend], env=env) for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=900) == 0
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    namespace = {"torch": torch}
    exec(PROBLEM, namespace)
    params, x, loss = namespace["params"], namespace["x"], namespace["loss"]
    for (method, name, shaping), (grads, weights) in ranks[0].items():
        other_grads, other_weights = ranks[1][(method, name, shaping)]
        assert all(torch.equal(a, b) for a, b in zip(grads, other_grads))  # every rank: the same gradient
        assert torch.equal(weights, other_weights)
        single = zo_kernels.estimate(
            loss, params, x, distribution=getattr(distributions, name)(), method=method, num_samples=7, sigma=0.05,
            seed=11, fitness_shaping=shaping,
        )  # fmt: skip
        assert torch.equal(single.weights, weights)
        # The decorator's seed came from rank 0's RNG (seeded 100): replay it in one process.
        torch.manual_seed(100)
        tree = {k: v.clone().requires_grad_() for k, v in params.items()}
        zo_kernels.zero_order(
            getattr(distributions, name)(), method=method, num_samples=7, sigma=0.05, fitness_shaping=shaping
        )(loss)(tree, x).backward()
        assert all(torch.equal(tree[k].grad, g) for k, g in zip(tree, grads))


def test_process_group_errors():
    with pytest.raises((RuntimeError, TypeError), match="process_group"):
        zo_kernels.zero_order(distributions.Normal(), process_group=object())
    with pytest.raises(ValueError, match="built-in distribution"):
        zo_kernels.zero_order(torch.distributions.Laplace(0.0, 1.0), process_group=object())
