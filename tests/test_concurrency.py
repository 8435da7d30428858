"""Concurrency: threads using the decorator get what they would get alone; CUDA work follows the caller's stream."""

import threading

import pytest
import torch

import zo_kernels
from zo_kernels import distributions

ROUNDS = 10


def problem(seed):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(40, 8, generator=g), "b": torch.randn(8, generator=g)}
    x = torch.randn(16, 40, generator=g)

    def loss(p, x):
        return (x @ p["w"] + p["b"]).tanh().square().mean()

    return params, x, loss


def run(fn, params, x, device="cpu"):
    grads = []
    for _ in range(ROUNDS):
        tree = {k: v.to(device).clone().requires_grad_() for k, v in params.items()}
        fn(tree, x.to(device)).backward()
        grads.append([tree[k].grad.cpu() for k in tree])
    return grads


def in_threads(jobs):
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def work(k, job):
        try:
            barrier.wait()
            results[k] = job()
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


@pytest.mark.parametrize(
    "options", [dict(), dict(batch_size=4), dict(inplace=True)], ids=["loop", "batched", "inplace"]
)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_two_threads_with_different_seeds_match_sequential_runs(options, backend):
    if zo_kernels.backends.available()[backend] != "available":
        pytest.skip(f"{backend}: {zo_kernels.backends.available()[backend]}")
    jobs = []
    for seed in (1, 2):
        params, x, loss = problem(seed)
        fn = zo_kernels.zero_order(
            distributions.Normal(), method="antithetic", num_samples=6, sigma=0.05, seed=seed, backend=backend,
            **options,
        )(loss)  # fmt: skip
        jobs.append(lambda fn=fn, params=params, x=x: run(fn, params, x))
    sequential = [job() for job in jobs]
    concurrent = in_threads(jobs)
    for seq, con in zip(sequential, concurrent):
        for a, b in zip(seq, con):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_one_decorated_function_shared_by_two_threads():
    params, x, loss = problem(3)
    fn = zo_kernels.zero_order(distributions.Normal(), method="forward", num_samples=5, sigma=0.05, seed=9)(loss)
    alone = run(fn, params, x)
    both = in_threads([lambda: run(fn, params, x), lambda: run(fn, params, x)])
    for result in both:
        for a, b in zip(alone, result):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_result_is_right_on_a_non_default_cuda_stream(backend):
    if zo_kernels.backends.available()[backend] != "available":
        pytest.skip(f"{backend}: {zo_kernels.backends.available()[backend]}")
    params, x, loss = problem(4)
    fn = zo_kernels.zero_order(
        distributions.Normal(), method="antithetic", num_samples=6, sigma=0.05, seed=2, backend=backend
    )(loss)
    on_default = run(fn, params, x, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Work queued on the side stream before the estimate: our kernels must be ordered after it.
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            big = big @ big / 64.0
        on_side = run(fn, params, x, "cuda")
    torch.cuda.synchronize()
    for a, b in zip(on_default, on_side):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
