"""python/es_maml_nav.py: the navigation task by hand, the hill climbing, the vmapped meta-gradient, a quick run."""

import math
import os
import re
import sys
import warnings

import pytest
import torch

import zo_kernels
from zo_kernels.distributions import Normal

# python/ only while importing the example: its script names (demo, distributed, ...) must not shadow others
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
try:
    import es_maml_nav as nav
finally:
    sys.path.pop(0)


def linear(w, b):
    return torch.tensor([w[0][0], w[0][1], w[1][0], w[1][1], b[0], b[1]], dtype=torch.float64)


def test_step_clips_the_action_and_pays_minus_the_distance_to_the_goal():
    pos = torch.tensor([0.0, 0.0], dtype=torch.float64)
    goal = torch.tensor([0.1, 0.2], dtype=torch.float64)
    new_pos, reward = nav.nav_step(pos, torch.tensor([0.3, -0.05], dtype=torch.float64), goal)
    # x clipped to 0.1, y unclipped: (0.1, -0.05), then 0.25 away from the goal
    assert torch.allclose(new_pos, torch.tensor([0.1, -0.05], dtype=torch.float64))
    assert float(reward) == pytest.approx(-0.25)
    new_pos, reward = nav.nav_step(new_pos, torch.tensor([-1.0, 1.0], dtype=torch.float64), goal)
    assert torch.allclose(new_pos, torch.tensor([0.0, 0.05], dtype=torch.float64))
    assert float(reward) == pytest.approx(-math.hypot(0.1, 0.15))


def test_rollout_returns_of_hand_computed_policies():
    goal = torch.tensor([0.3, 0.0], dtype=torch.float64)
    # constant action (0.1, 0): x = 0.1, 0.2, 0.3, 0.4 -> rewards -0.2, -0.1, 0, -0.1
    push = linear([[0, 0], [0, 0]], [0.1, 0.0])
    assert float(nav.rollout_return(push, goal, 4, 0)) == pytest.approx(-0.4)
    # a = g - s: the first action (0.15, 0.1) is clipped to (0.1, 0.1), then it lands on the goal and stays
    goal = torch.tensor([0.15, 0.1], dtype=torch.float64)
    seek = linear([[-1, 0], [0, -1]], [0.15, 0.1])
    assert float(nav.rollout_return(seek, goal, 3, 0)) == pytest.approx(-0.05)
    # the batch dims of policies and goals broadcast: (2, 1, P) x (3, 2) -> (2, 3)
    goals = torch.tensor([[0.3, 0.0], [0.0, 0.0], [0.15, 0.1]], dtype=torch.float64)
    both = torch.stack((push, seek)).unsqueeze(1)
    returns = nav.rollout_return(both, goals, 3, 0)
    assert returns.shape == (2, 3)
    for i, p in enumerate((push, seek)):
        for j in range(3):
            assert float(returns[i, j]) == pytest.approx(float(nav.rollout_return(p, goals[j], 3, 0)))


def test_mlp_policy_has_the_advertised_parameter_count():
    params = torch.zeros(nav.num_policy_params(4))
    assert params.numel() == 5 * 4 + 2
    params[-2:] = torch.tensor([0.05, -0.02])  # the output bias alone: a constant action
    action = nav.policy_action(params, torch.randn(3, 2), 4)
    assert torch.allclose(action, torch.tensor([0.05, -0.02]).expand(3, 2))


def test_hill_climbing_keeps_the_best_candidate_only_if_it_improves():
    theta = linear([[-1, 0], [0, -1]], [0.0, 0.0])  # stays at the origin
    log_step = torch.zeros(6, dtype=torch.float64)  # unit scale: candidate = current + noise
    goals = torch.tensor([[0.2, 0.0], [0.0, 0.0]], dtype=torch.float64)
    noise = torch.zeros(1, 2, 3, 6, dtype=torch.float64)
    noise[0, :, 0, 4] = 0.2  # b = (0.2, 0): equilibrium at (0.2, 0), the first task's goal
    noise[0, :, 1, 5] = 0.1  # b = (0, 0.1): a detour
    noise[0, :, 2, 4] = -0.1
    adapted, after, before = nav.hill_climb(theta, log_step, goals, noise, 10, 0)
    assert torch.equal(adapted[0], theta + noise[0, 0, 0])  # task 0: the candidate towards its goal
    assert torch.equal(adapted[1], theta)  # task 1 (goal at the start): no candidate beats staying
    assert float(after[1]) == float(before[1]) == 0.0
    assert float(after[0]) > float(before[0])
    for t in range(2):
        assert float(after[t]) == pytest.approx(float(nav.rollout_return(adapted[t], goals[t], 10, 0)))


def test_vmapped_meta_gradient_equals_the_loop():
    gen = torch.Generator().manual_seed(3)
    meta = nav.init_meta(0, 0.05, gen)
    goals = nav.sample_goals(4, gen)
    noise = torch.randn(2, 4, 5, 6, generator=gen)
    grads = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vmap fallback warns: the adaptation must vmap
        for batch_size in (None, 8):
            fn = zo_kernels.zero_order(
                Normal(), method="antithetic", num_samples=4, sigma=0.05, seed=11, batch_size=batch_size
            )(nav.neg_adapted_return)
            for t in meta.values():
                t.grad = None
            fn(meta, goals, noise, 20, 0).backward()
            grads[batch_size] = {k: t.grad.clone() for k, t in meta.items()}
    for k in meta:
        assert grads[None][k].abs().sum() > 0, k
        assert torch.allclose(grads[None][k], grads[8][k], rtol=1e-4, atol=1e-5), k


def test_quick_run_improves_the_post_adaptation_return(tmp_path, capsys):
    args = nav.parse_args(["--quick"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no vmap fallback
        history, meta = nav.train(args)
    assert [h["step"] for h in history] == list(range(0, args.meta_steps + 1, args.print_every))
    assert all(math.isfinite(h["before"]) and math.isfinite(h["after"]) for h in history)
    # monotonic hill climbing on a deterministic task: never worse than the policy it starts from
    assert all(h["after"] >= h["before"] for h in history)
    first, last = history[0], history[-1]
    assert last["after"] > first["after"] + 2.0, history  # measured: -6.57 -> -2.22 on 64 held-out tasks
    assert last["after"] > last["before"] + 2.0, history  # adaptation helps the meta-trained policy

    out = tmp_path / "log.md"
    assert nav.main(["--quick", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    text = out.read_text()
    assert "`python python/es_maml_nav.py --quick --out" in text
    assert len(re.findall(r"^meta-step +\d+ +held-out return before", text, flags=re.M)) == len(history)
    summary = re.search(r"held-out return after adaptation (-?[0-9.]+) -> (-?[0-9.]+)", stdout)
    assert summary and float(summary.group(1)) == pytest.approx(first["after"], abs=0.01), stdout
    assert float(summary.group(2)) == pytest.approx(last["after"], abs=0.01), stdout  # same seed, same run
    assert re.search(r"^\| +meta-step +\| +return before adaptation", text, flags=re.M), text
    assert "learned meta-policy: W = " in text
