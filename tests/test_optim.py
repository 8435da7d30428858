"""ZOSGD and ZOAdam as torch.optim.Optimizers: param groups, state_dict, LR schedulers, iterables, strides."""

import copy
import dataclasses
import io

import pytest
import torch

import zo_kernels
from zo_kernels import SeedGradient, backends
from zo_kernels.optim import ZOSGD, ZOAdam

KINDS = {
    "sgd": lambda params, lr=0.1: ZOSGD(params, lr=lr),
    "momentum": lambda params, lr=0.1: ZOSGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr=0.1: ZOAdam(params, lr=lr),
}


def layout():
    """Parameters of every float dtype and a matrix (LowRank noise treats matrices apart), from fixed values."""
    return [
        torch.linspace(-1, 1, 5, dtype=torch.float32),
        torch.linspace(0, 2, 6, dtype=torch.float64).reshape(2, 3),
        torch.linspace(-2, 0.5, 4, dtype=torch.bfloat16),
        torch.linspace(-0.5, 0.5, 12, dtype=torch.float16).reshape(3, 4),
    ]


def seed_gradient(stream="normal", rank=None, seed=2**40 + 17, params=None):
    params = layout() if params is None else params
    return SeedGradient(
        seed=seed,
        sample_ids=torch.tensor([0, 1, 5]),
        weights=torch.tensor([0.75, -1.25, 0.5], dtype=torch.float64),
        sigma=0.1,
        stream=stream,
        shapes=[p.shape for p in params],
        dtypes=[p.dtype for p in params],
        rank=rank,
    )


def quadratic(params):
    return sum((p.double() - 0.25).square().sum() for p in params)


def estimates(params, count, **kw):
    """``count`` estimates for ``params`` (all float32/float64, so that estimate() takes them)."""
    return [zo_kernels.estimate(quadratic, params, num_samples=3, sigma=0.1, seed=100 + i, **kw) for i in range(count)]


def small():
    return [torch.linspace(-1, 1, 6).reshape(2, 3), torch.linspace(0, 1, 4, dtype=torch.float64)]


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, entry in a["state"].items():
        assert entry.keys() == b["state"][i].keys()
        for key, value in entry.items():
            other = b["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# -- the fused step stays what it was ---------------------------------------------------------------

#: ZOSGD(lr=0.3).step(seed_gradient("rademacher")) on layout(), computed with the code before ZOSGD became a
#: torch.optim.Optimizer (identical on the reference and cpu backends: Rademacher noise is +-1, so only the sums round).
PRE_CHANGE_RADEMACHER = [
    [-0.5499999523162842, -0.5, 0.0, -0.25, 1.2999999523162842],
    [0.44999999999999996, 0.4, 0.5, 1.95, 2.05, 1.55],
    [-2.0, -0.87109375, -1.078125, 1.25],
    [-0.9501953125, -0.708984375, -0.318359375, 0.07269287109375, -0.88671875, -0.345703125, -0.7041015625,
     0.4365234375, 0.9775390625, 0.318359375, 0.859375, 0.04998779296875],
]


@pytest.mark.usefixtures("each_cpu_backend")
def test_fused_step_gives_the_pre_change_values():
    params = layout()
    ZOSGD(params, lr=0.3).step(seed_gradient("rademacher"))
    for p, expected in zip(params, PRE_CHANGE_RADEMACHER):
        assert torch.equal(p.reshape(-1), torch.tensor(expected, dtype=torch.float64).to(p.dtype))


@pytest.mark.usefixtures("each_cpu_backend")
@pytest.mark.parametrize("stream, rank", [("normal", None), ("rademacher", None), ("normal", 2)])
def test_fused_step_is_the_step_kernel_bit_for_bit(stream, rank, monkeypatch):
    """ZOSGD(momentum=0) is one step-kernel call per tensor (what it was before): no gradient, no state."""
    sg = seed_gradient(stream, rank)
    params, applied = layout(), layout()
    monkeypatch.setattr(SeedGradient, "_gradient", lambda *a: pytest.fail("the fused step materialized g"))
    opt = ZOSGD(params, lr=0.3)
    opt.step(sg)
    sg.apply_(applied, 0.3)
    offset = 0
    for p, q, start in zip(params, applied, layout()):
        assert torch.equal(p, q)
        if rank is None:  # the kernel itself, as the code before this change called it
            backends.select(start.device, start.dtype).step(
                start.view(-1), sg.weights, sg.sample_ids, stream, sg.seed, 0.3, offset
            )
            assert torch.equal(p, start)
        offset += p.numel()
    assert opt.state_dict()["state"] == {} and not opt.state


# -- torch.optim.Optimizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_is_a_torch_optimizer_and_zero_grad_is_harmless(kind):
    params = small()
    for p in params:
        p.grad = torch.full_like(p, 1e6)  # never read
    opt = KINDS[kind](params)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["params"] == params and opt.param_groups[0]["lr"] == 0.1
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    twin = KINDS[kind]([p.clone() for p in params])
    for sg in estimates(params, 2):
        opt.step(sg)
        twin.step(sg)
    for p, q in zip(params, twin.param_groups[0]["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", ["nothing", "closure", "tensor"])
def test_step_without_a_seed_gradient_says_what_to_pass(kind, call):
    params = small()
    opt = KINDS[kind](params)
    args = {"nothing": (), "closure": (lambda: quadratic(params),), "tensor": (torch.zeros(3),)}[call]
    name = type(opt).__name__
    with pytest.raises(TypeError, match=rf"{name}\.step needs a SeedGradient \(from zo_kernels.estimate\), got "):
        opt.step(*args)
    with pytest.raises(TypeError, match=r"call opt.step\(zo_kernels.estimate\(fn, params, ...\)\)"):
        opt.step(*args)


@pytest.mark.parametrize("kind", KINDS)
def test_param_groups_step_with_their_own_options(kind):
    """Groups are concatenated in order in the SeedGradient; each steps with its own lr (and momentum)."""
    params = small()
    second = {"lr": 0.3, "momentum": 0.5} if kind != "adam" else {"lr": 0.3, "betas": (0.5, 0.9)}
    if kind == "sgd":
        second["momentum"] = 0.0
    opt = KINDS[kind]([{"params": [params[0]]}, {"params": [params[1]], **second}])
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    first_twin = KINDS[kind]([p.clone() for p in params])
    second_twin = type(opt)([p.clone() for p in params], **second)
    for sg in estimates(params, 3):
        for o in (opt, first_twin, second_twin):
            o.step(sg)
    assert torch.equal(params[0], first_twin.param_groups[0]["params"][0])
    assert torch.equal(params[1], second_twin.param_groups[0]["params"][1])


def test_groups_with_and_without_momentum_mix():
    params = small()
    opt = ZOSGD([{"params": [params[0]], "momentum": 0.9}, {"params": [params[1]]}], lr=0.1)
    with_momentum, fused = ZOSGD([p.clone() for p in params], 0.1, 0.9), ZOSGD([p.clone() for p in params], 0.1)
    for sg in estimates(params, 3):
        for o in (opt, with_momentum, fused):
            o.step(sg)
    assert torch.equal(params[0], with_momentum.param_groups[0]["params"][0])
    assert torch.equal(params[1], fused.param_groups[0]["params"][1])
    assert list(opt.state_dict()["state"]) == [0]


@pytest.mark.parametrize("kind", KINDS)
def test_add_param_group(kind):
    params = small()
    opt = KINDS[kind]([params[0]])
    opt.add_param_group({"params": params[1], "lr": 0.3})
    assert opt.param_groups[1]["lr"] == 0.3 and opt.param_groups[1]["params"] == [params[1]]
    twin = KINDS[kind]([p.clone() for p in params], lr=0.3)
    for sg in estimates(params, 2):
        opt.step(sg)
        twin.step(sg)
    assert torch.equal(params[1], twin.param_groups[0]["params"][1])
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['lr'\] must be a finite real number >= 0"):
        opt.add_param_group({"params": [torch.zeros(2)], "lr": -1.0})
    with pytest.raises(TypeError, match=r"params leaf 2 must be a floating-point tensor, got dtype torch.int64"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.param_groups) == 2


def test_step_lr_changes_the_lr_of_the_next_step():
    """StepLR(ZOAdam(...), 10): the 11th step uses lr * 0.1, as a twin whose lr is set by hand."""
    params = small()
    opt = ZOAdam(params, lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 10)
    twin = ZOAdam([p.clone() for p in params], lr=0.05)
    for k, sg in enumerate(estimates(params, 12)):
        opt.step(sg)
        twin.step(sg)
        scheduler.step()
        if k == 9:
            twin.param_groups[0]["lr"] = 0.05 * 0.1
            assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    for p, q in zip(params, twin.param_groups[0]["params"]):
        assert torch.equal(p, q)


def test_scheduled_zosgd_is_apply_with_the_scheduled_lr():
    params = small()
    opt = ZOSGD(params, lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    applied = [p.clone() for p in params]
    for lr, sg in zip((0.4, 0.2, 0.1), estimates(params, 3)):
        opt.step(sg)
        scheduler.step()
        sg.apply_(applied, lr)
    for p, q in zip(params, applied):
        assert torch.equal(p, q)


# -- state_dict / load_state_dict ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["momentum", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_checkpoint_through_torch_save_resumes_bit_for_bit(kind, dtype):
    params = [p.to(dtype) for p in small()]
    sgs = [seed_gradient(seed=s, params=params) for s in range(6)]
    opt = KINDS[kind](params)
    for sg in sgs[:3]:
        opt.step(sg)
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups"} and set(state["state"]) == {0, 1}
    keys = {"momentum_buffer"} if kind == "momentum" else {"step", "exp_avg", "exp_avg_sq"}
    assert set(state["state"][0]) == keys
    buf = io.BytesIO()
    torch.save({"params": params, "optimizer": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = KINDS[kind](saved["params"], lr=0.5)  # the lr comes from the checkpoint
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups[0]["lr"] == 0.1
    for key in keys - {"step"}:  # copies: the checkpoint is not shared, half-precision moments stay float32
        loaded, source = resumed.state[saved["params"][1]][key], saved["optimizer"]["state"][1][key]
        assert loaded.data_ptr() != source.data_ptr() and loaded.dtype == source.dtype
    for sg in sgs[3:]:
        opt.step(sg)
        resumed.step(sg)
    for p, q in zip(params, saved["params"]):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), resumed.state_dict())


def corrupt_adam_state(state, case):
    groups, entry = state["param_groups"], state["state"][0]
    if case == "no groups":
        state["param_groups"] = []
    elif case == "group size":
        groups[0]["params"] = groups[0]["params"][:1]
    elif case == "lr":
        groups[0]["lr"] = float("nan")
    elif case == "betas":
        groups[0]["betas"] = (0.9, 1.0)
    elif case == "shape":
        entry["exp_avg"] = torch.zeros(7)
    elif case == "missing":
        del entry["exp_avg_sq"]
    elif case == "step":
        entry["step"] = -1
    elif case == "unknown id":
        state["state"][9] = dict(entry)
    elif case == "not a dict":
        return [state]
    return state


ADAM_CASES = {
    "no groups": (ValueError, r"state_dict\['param_groups'\] must have one entry per group \(1\), got 0"),
    "group size": (ValueError, r"state_dict\['param_groups'\]\[0\]\['params'\] must list 2 parameters, got 1"),
    "lr": (ValueError, r"state_dict\['param_groups'\]\[0\]\['lr'\] must be a finite real number"),
    "betas": (ValueError, r"state_dict\['param_groups'\]\[0\]\['betas'\] must be two numbers in \[0, 1\)"),
    "shape": (ValueError, r"state_dict\['state'\]\[0\]\['exp_avg'\] must have the parameter's shape \(2, 3\)"),
    "missing": (ValueError, r"state_dict\['state'\]\[0\] has no 'exp_avg_sq'"),
    "step": (ValueError, r"state_dict\['state'\]\[0\]\['step'\] must be an int in \[0, 2\*\*63\), got -1"),
    "unknown id": (ValueError, r"has an entry for parameter 9, which no param group lists"),
    "not a dict": (TypeError, r"state_dict must be a dict with 'state' and 'param_groups'"),
}


@pytest.mark.parametrize("case", ADAM_CASES)
def test_load_state_dict_checks_everything_before_changing_anything(case):
    params = small()
    source = ZOAdam([p.clone() for p in params])
    source.step(estimates(params, 1)[0])
    target = ZOAdam(params, lr=0.2)
    target.step(estimates(params, 1)[0])
    before = snapshot(target)
    exc, match = ADAM_CASES[case]
    with pytest.raises(exc, match=match):
        target.load_state_dict(corrupt_adam_state(snapshot(source), case))
    assert_same_state(before, target.state_dict())


def test_zosgd_loads_a_state_without_momentum_buffers():
    params = small()
    opt = ZOSGD(params, lr=0.1, momentum=0.9)
    opt.step(estimates(params, 1)[0])
    opt.load_state_dict(ZOSGD([p.clone() for p in params], lr=0.2, momentum=0.5).state_dict())
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["momentum"] == 0.5 and not opt.state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["layout", "seed", "weights", "stream"])
def test_an_unusable_estimate_changes_nothing(kind, bad):
    params = small()
    opt = KINDS[kind](params)
    first = estimates(params, 1)[0]
    opt.step(first)
    before, values = snapshot(opt), [p.clone() for p in params]
    change = {"seed": {"seed": -1}, "weights": {"weights": torch.ones(2, dtype=torch.float64)}}
    change["stream"] = {"stream": "uniform"}
    if bad == "layout":
        grad, exc = zo_kernels.estimate(quadratic, [torch.zeros(5)], num_samples=2, seed=1), ValueError
    else:
        grad, exc = dataclasses.replace(first, **change[bad]), (TypeError, ValueError)
    with pytest.raises(exc, match="layout|seed|weights|stream"):
        opt.step(grad)
    assert all(torch.equal(p, q) for p, q in zip(params, values))
    assert_same_state(before, opt.state_dict())


# -- what params may be ----------------------------------------------------------------------------


def forms():
    """The same two tensors as a list, a generator, dict.values(), a tuple and a nested pytree."""
    return {
        "list": lambda ps: list(ps),
        "generator": lambda ps: (p for p in ps),
        "module.parameters()": lambda ps: torch.nn.ParameterList(ps).parameters(),
        "dict.values()": lambda ps: {"a": ps[0], "b": ps[1]}.values(),
        "tuple": lambda ps: tuple(ps),
        "pytree": lambda ps: {"a": [ps[0]], "b": (ps[1],)},
    }


@pytest.mark.parametrize("form", forms())
@pytest.mark.parametrize("kind", KINDS)
def test_any_iterable_of_tensors(form, kind):
    with torch.no_grad():
        params = [torch.nn.Parameter(p) for p in small()]
        opt = KINDS[kind](forms()[form](params))
        twin = KINDS[kind]([p.clone() for p in params])
    assert opt.param_groups[0]["params"] == params
    for sg in estimates(params, 2):
        opt.step(sg)
        twin.step(sg)
    for p, q in zip(params, twin.param_groups[0]["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", KINDS)
def test_sets_and_empty_params_are_refused(kind):
    with pytest.raises(TypeError, match="params must be an ordered collection of tensors"):
        KINDS[kind](set(small()))
    with pytest.raises(ValueError, match="params must hold at least one tensor"):
        KINDS[kind](p for p in [])


# -- one rule for strided parameters -----------------------------------------------------------------

STRIDED = {
    "transposed": lambda p: p.t().contiguous().t(),
    "sliced": lambda p: torch.stack([p, torch.full_like(p, 7.0)], -1)[..., 0],
}
UPDATES = {
    "apply_": lambda params, sg: sg.apply_(params, 0.1),
    **{kind: lambda params, sg, kind=kind: KINDS[kind](params).step(sg) for kind in KINDS},
}


@pytest.mark.usefixtures("each_cpu_backend")
@pytest.mark.parametrize("strided", STRIDED)
@pytest.mark.parametrize("update", UPDATES)
def test_strided_parameters_step_as_contiguous_ones(strided, update):
    contiguous = [torch.linspace(-1, 1, 12).reshape(3, 4), torch.linspace(0, 1, 4, dtype=torch.float64)]
    params = [STRIDED[strided](p) for p in contiguous]
    assert not params[0].is_contiguous() and torch.equal(params[0], contiguous[0])
    sg = estimates(contiguous, 1)[0]
    storage = params[0].untyped_storage().data_ptr()
    UPDATES[update](params, sg)
    UPDATES[update](contiguous, sg)
    assert params[0].untyped_storage().data_ptr() == storage  # updated where it is
    for p, q in zip(params, contiguous):
        assert torch.equal(p, q)


@pytest.mark.parametrize("update", UPDATES)
def test_parameters_whose_elements_share_memory_are_refused(update):
    """expand(): one memory location for several elements. Refused, naming the call, before anything changes."""
    base = torch.zeros(1, 4)
    params = [base.expand(3, 4), torch.linspace(0, 1, 4, dtype=torch.float64)]
    sg = estimates([p.clone() for p in params], 1)[0]
    second = params[1].clone()
    caller = "apply_" if update == "apply_" else ("ZOAdam" if update == "adam" else "ZOSGD") + r"\.step"
    with pytest.raises(ValueError, match=rf"^{caller} updates parameters in place: .* but leaf 0 is not"):
        UPDATES[update](params, sg)
    assert torch.equal(params[1], second) and not base.any()
