"""zo_kernels.journal: a run's steps recorded and replayed bit for bit, torn tails, corruption, mismatches, resume;
the elastic example (a rank SIGKILLed under torchrun) and the fine-tuning examples' --resume."""

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import zo_kernels
from zo_kernels.distributions import LowRank, Normal
from zo_kernels.journal import Journal, fingerprint, replay
from zo_kernels.optim import ZOSGD, ZOAdam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 600  # torchrun and the examples take seconds; this only stops a hang

OPTIMIZERS = {
    "zosgd": lambda p: ZOSGD(p, lr=0.05),
    "momentum": lambda p: ZOSGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: ZOAdam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    "none": lambda p: None,
}
X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))


def start(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype)]


def loss(ps):
    return ((X @ ps[0].float() + ps[1].float()).tanh() - Y).square().mean()


def record(path, opt_name="momentum", steps=4, dtype=torch.float32, distribution=None, after_each=None):
    """Train ``steps`` steps, journaling each (the learning rate halves after step 1); the params and optimizer."""
    params = start(dtype)
    opt = OPTIMIZERS[opt_name](params)
    lr = 0.05
    with Journal(path, params, opt) as journal:
        for step in range(steps):
            sg = zo_kernels.estimate(
                loss, params, distribution=distribution, method="antithetic", num_samples=4, sigma=0.1, seed=100 + step
            )
            if opt is None:
                sg.apply_(params, lr)
                journal.append(sg, lr=lr)
            else:
                opt.step(sg)
                journal.append(sg)
            if step == 1:  # a schedule: the records after this one carry the new options
                lr /= 2
                for group in opt.param_groups if opt else ():
                    group["lr"] /= 2
            if after_each:
                after_each(step, params, opt)
    return params, opt


def assert_same_state(a, b):
    assert (a is None) == (b is None)
    if a is None:
        return
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            other = sb["state"][k][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (k, key)


def assert_equal(xs, ys):
    assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", [Normal(), LowRank(1)], ids=["normal", "lowrank"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_replay_equals_the_recorded_run_bit_for_bit(tmp_path, opt_name, distribution, dtype):
    path = tmp_path / "run.zoj"
    trained, trained_opt = record(path, opt_name, dtype=dtype, distribution=distribution)
    params = start(dtype)
    opt = OPTIMIZERS[opt_name](params)
    assert replay(path, params, opt, distribution=distribution) == 4
    assert_equal(params, trained)
    assert_same_state(opt, trained_opt)  # momentum buffers, Adam moments and steps, and the scheduled lr
    assert not torch.equal(params[0], start(dtype)[0])


def test_a_record_holds_46_plus_8n_bytes_and_other_ids_round_trip(tmp_path):
    params = start()
    sg = zo_kernels.estimate(loss, params, num_samples=16, sigma=0.1, seed=5)
    scattered = zo_kernels.SeedGradient.from_state_dict({**sg.state_dict(), "sample_ids": [7, 2**32 - 1, 3] + [9] * 13})
    with Journal(tmp_path / "j.zoj", params) as journal:
        journal.append(sg, lr=0.1)
        first = journal.last_record_bytes  # carries the options: the learning rate, as JSON
        journal.append(sg, lr=0.1)
        assert journal.last_record_bytes == 46 + 8 * 16 < first
        journal.append(scattered, lr=0.1)
        assert journal.last_record_bytes == 42 + 12 * 16  # N ids of 4 bytes instead of a 4-byte range
    expected = start()
    for s in (sg, sg, scattered):
        s.apply_(expected, 0.1)
    params = start()
    assert replay(tmp_path / "j.zoj", params) == 3
    assert_equal(params, expected)


def sizes_after_each_step(path):
    sizes = []
    states = []
    record(path, after_each=lambda step, p, o: (sizes.append(os.path.getsize(path)), states.append(clone(p, o))))
    return sizes, states


def clone(params, opt):
    copy = [p.clone() for p in params]
    opt_copy = OPTIMIZERS["momentum"](copy)
    opt_copy.load_state_dict(opt.state_dict())
    return copy, opt_copy


def test_a_torn_tail_is_dropped_with_a_warning_at_every_cut(tmp_path):
    path = tmp_path / "run.zoj"
    sizes, states = sizes_after_each_step(path)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.zoj"
    cut_path.write_bytes(data[: sizes[2]])
    params = start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cut between records is a complete journal: no warning
        assert replay(cut_path, params, OPTIMIZERS["momentum"](params)) == 3
    for cut in range(sizes[2] + 1, sizes[3]):
        cut_path.write_bytes(data[:cut])
        params = start()
        opt = OPTIMIZERS["momentum"](params)
        message = rf"byte offset {sizes[2]} \({cut - sizes[2]} bytes .*replaying the 3 complete records"
        with pytest.warns(RuntimeWarning, match=message):
            assert replay(cut_path, params, opt) == 3
        assert_equal(params, states[2][0])
        assert_same_state(opt, states[2][1])


def untouched(params, opt, fn, error, match):
    before = [p.clone() for p in params]
    state = opt.state_dict() if opt is not None else None
    with pytest.raises(error, match=match):
        fn()
    assert_equal(params, before)
    if opt is not None:
        assert str(opt.state_dict()) == str(state)


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_corrupted_record_raises_and_a_corrupted_last_one_is_a_torn_tail(tmp_path):
    path = tmp_path / "run.zoj"
    sizes, states = sizes_after_each_step(path)
    pristine = path.read_bytes()
    flip(path, sizes[0] + 20)  # inside record 1, complete records after it
    params = start()
    opt = OPTIMIZERS["momentum"](params)
    match = rf"record 1 \(byte offset {sizes[0]}\): checksum mismatch.*corrupted"
    untouched(params, opt, lambda: replay(path, params, opt), ValueError, match)
    untouched(params, opt, lambda: Journal(path, params, opt), ValueError, match)

    path.write_bytes(pristine)
    flip(path, sizes[3] - 3)  # inside the last record: indistinguishable from a torn write
    with pytest.warns(RuntimeWarning, match="torn record"):
        assert replay(path, params, opt) == 3
    assert_equal(params, states[2][0])

    path.write_bytes(pristine)
    flip(path, 20)  # the header
    untouched(params, opt, lambda: replay(path, params, opt), ValueError, "header is damaged")


MISMATCHES = {
    "fingerprint": (lambda: start(), lambda p: OPTIMIZERS["momentum"](p), {}, "fingerprint"),
    "layout-shape": (lambda: [torch.zeros(4, 6), torch.zeros(4)], lambda p: None, {}, r"layout: tensor 0 is \[4, 6\]"),
    "layout-dtype": (lambda: start(torch.float64), lambda p: None, {}, "layout: tensor 0 .* torch.float64"),
    "layout-count": (lambda: start()[:1], lambda p: None, {}, "has 1 tensors; the journal's layout has 2"),
    "optimizer-missing": (start, lambda p: None, {}, "recorded with optimizer zo_kernels.optim.ZOSGD"),
    "optimizer-class": (start, lambda p: ZOAdam(p), {}, "optimizer is zo_kernels.optim.ZOAdam, but .*ZOSGD"),
    "optimizer-momentum": (start, lambda p: ZOSGD(p, lr=0.05, momentum=0.5), {}, r"momentum=0.5 \(the journal's: 0.9"),
    "optimizer-lr": (start, lambda p: ZOSGD(p, lr=0.5, momentum=0.9), {}, r"lr=0.5 \(the journal's: 0.05"),
    "optimizer-groups": (
        start,
        lambda p: ZOSGD([{"params": p[:1]}, {"params": p[1:]}], lr=0.05, momentum=0.9),
        {},
        r"param groups hold \[1, 1\] tensors, the journal's \[2\]",
    ),
    "distribution": (start, lambda p: OPTIMIZERS["momentum"](p), {"distribution": LowRank(1)}, "distribution is"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatch_raises_naming_it_and_changes_nothing(tmp_path, case):
    path = tmp_path / "run.zoj"
    record(path)
    make_params, make_opt, kwargs, match = MISMATCHES[case]
    params = make_params()
    if case == "fingerprint":
        params[1][0] += 1e-3
    opt = make_opt(params)
    untouched(params, opt, lambda: replay(path, params, opt, **kwargs), ValueError, match)
    if case != "fingerprint":  # resuming checks all but the fingerprint
        untouched(params, opt, lambda: Journal(path, params, opt, **kwargs), ValueError, match)


def test_a_journal_without_an_optimizer_refuses_one(tmp_path):
    record(tmp_path / "run.zoj", "none")
    params = start()
    opt = ZOSGD(params, lr=0.05)
    untouched(params, opt, lambda: replay(tmp_path / "run.zoj", params, opt), ValueError, "without an optimizer")


def test_resume_after_a_torn_tail_continues_the_run_bit_for_bit(tmp_path):
    straight, straight_opt = record(tmp_path / "straight.zoj", steps=6)
    path = tmp_path / "run.zoj"
    sizes, _ = sizes_after_each_step(path)  # 4 steps, then a crash while appending the 4th
    path.write_bytes(path.read_bytes()[: sizes[2] + 10])
    params = start()
    opt = OPTIMIZERS["momentum"](params)
    with pytest.warns(RuntimeWarning, match="replaying the 3 complete records"):
        done = replay(path, params, opt)
    with pytest.warns(RuntimeWarning, match=rf"byte offset {sizes[2]} .*truncating it, keeping the 3 complete"):
        journal = Journal(path, params, opt)
    with journal:
        assert journal.steps == done == 3 and os.path.getsize(path) == sizes[2]
        for step in range(done, 6):
            sg = zo_kernels.estimate(loss, params, method="antithetic", num_samples=4, sigma=0.1, seed=100 + step)
            opt.step(sg)
            journal.append(sg)
    assert_equal(params, straight)
    fresh = start()
    fresh_opt = OPTIMIZERS["momentum"](fresh)
    assert replay(path, fresh, fresh_opt) == 6
    assert_equal(fresh, straight)
    assert_same_state(fresh_opt, straight_opt)


def sg_for(params, **kwargs):
    return zo_kernels.estimate(loss, params, num_samples=2, sigma=0.1, seed=3, **kwargs)


def reshaped(sg):
    return zo_kernels.SeedGradient.from_state_dict({**sg.state_dict(), "shapes": [[24], [4]]})


BAD_JOURNALS = {
    "path": (lambda tmp, p: Journal(123, p), TypeError, "path must be a str or os.PathLike, got int"),
    "path-bytes": (lambda tmp, p: replay(b"run.zoj", p), TypeError, "path must be a str or os.PathLike"),
    "params": (lambda tmp, p: Journal(tmp / "j.zoj", [p[0], "w"]), TypeError, "params leaf 1 must be a floating"),
    "params-int": (
        lambda tmp, p: Journal(tmp / "j.zoj", [torch.zeros(2, dtype=torch.long)]),
        TypeError,
        "params leaf 0",
    ),
    "optimizer-torch": (
        lambda tmp, p: Journal(tmp / "j.zoj", p, torch.optim.SGD(p, lr=0.1)),
        TypeError,
        "optimizer must be a zo_kernels.optim optimizer",
    ),
    "optimizer-other-tensors": (
        lambda tmp, p: Journal(tmp / "j.zoj", p, ZOSGD(start(), lr=0.1)),
        ValueError,
        "optimizer must step the tensors of params",
    ),
    "distribution": (
        lambda tmp, p: Journal(tmp / "j.zoj", p, distribution="normal"),
        TypeError,
        "distribution must be a built-in",
    ),
    "not-a-journal": (
        lambda tmp, p: (tmp / "x").write_bytes(b"hello world") and replay(tmp / "x", p),
        ValueError,
        "is not a zo_kernels journal",
    ),
}


@pytest.mark.parametrize("case", list(BAD_JOURNALS))
def test_bad_arguments_are_named(tmp_path, case):
    fn, error, match = BAD_JOURNALS[case]
    with pytest.raises(error, match=match):
        fn(tmp_path, start())


BAD_APPENDS = {
    "sg": (lambda j, p: j.append(p[0], lr=0.1), TypeError, "sg must be a SeedGradient"),
    "layout": (lambda j, p: j.append(reshaped(sg_for(p)), lr=0.1), ValueError, r"sg has the layout \[\(\[24\]"),
    "lr-missing": (lambda j, p: j.append(sg_for(p)), TypeError, "lr is required"),
    "lr-nan": (lambda j, p: j.append(sg_for(p), lr=float("nan")), ValueError, "lr must be a finite"),
    "distribution": (
        lambda j, p: (j.append(sg_for(p), lr=0.1), j.append(sg_for(p, distribution=LowRank(1)), lr=0.1)),
        ValueError,
        r"sg is of LowRank\(rank=1\), but the journal's steps are of normal stream",
    ),
    "closed": (lambda j, p: (j.close(), j.append(sg_for(p), lr=0.1)), ValueError, "is closed"),
    "second-writer": (lambda j, p: Journal(j.path, p), RuntimeError, "open for writing elsewhere"),
}


@pytest.mark.parametrize("case", list(BAD_APPENDS))
def test_bad_appends_are_named_and_write_nothing(tmp_path, case):
    params = start()
    fn, error, match = BAD_APPENDS[case]
    with Journal(tmp_path / "j.zoj", params) as journal:
        size = os.path.getsize(journal.path)
        with pytest.raises(error, match=match):
            fn(journal, params)
        if case != "distribution":
            assert os.path.getsize(journal.path) == size
    with Journal(tmp_path / "o.zoj", params, ZOSGD(params, lr=0.1)) as journal:
        with pytest.raises(TypeError, match="lr is for a journal without an optimizer"):
            journal.append(sg_for(params), lr=0.1)


def test_the_fingerprint_covers_values_dtypes_and_shapes():
    params = start()
    assert fingerprint(params) == fingerprint(start()) == fingerprint(iter(start()))
    assert fingerprint(params) != fingerprint(start(torch.bfloat16))
    assert fingerprint(params) != fingerprint([params[0].reshape(4, 6), params[1]])
    params[1][3] = params[1][3].nextafter(torch.tensor(10.0))
    assert fingerprint(params) != fingerprint(start())


# --- the examples --------------------------------------------------------------------------------


def torchrun(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3"]
    done = subprocess.run(
        [sys.executable, *launcher, os.path.join(ROOT, "python", "elastic.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.slow
def test_elastic_training_survives_a_sigkill_bit_for_bit(tmp_path):
    common = ("--steps", "12", "--checkpoint-every", "5")
    straight = torchrun("--dir", str(tmp_path / "straight"), *common)
    killed = torchrun("--dir", str(tmp_path / "killed"), "--kill-at", "7", *common)
    assert "SIGKILL before step 7" in killed and "SIGKILL" not in straight, killed
    # the restart restored the checkpoint of step 5 and replayed steps 5 and 6 from the journal
    assert re.search(r"restored the checkpoint of step 5 and replayed 2 journaled steps.*resuming at step 7", killed)
    final = [torch.load(tmp_path / run / "final.pt", weights_only=True) for run in ("straight", "killed")]
    assert final[0]["step"] == final[1]["step"] == 12
    assert_equal(final[0]["params"], final[1]["params"])
    digest = re.findall(r"final parameters (sha256:[0-9a-f]+)", straight + killed)
    assert len(digest) == 2 and digest[0] == digest[1]


def load_example(name):
    if os.path.join(ROOT, "python") not in sys.path:  # the examples import their sibling modules
        sys.path.insert(0, os.path.join(ROOT, "python"))
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "python", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main(list(args)) == 0, out.getvalue()
    digest = re.findall(r"final parameters (sha256:[0-9a-f]+)", out.getvalue())
    assert len(digest) == 1, out.getvalue()
    return digest[0], out.getvalue()


EXAMPLES = {
    "mezo_finetune": ("--device", "cpu", "--d-model", "16", "--layers", "1", "--ff", "16", "--batch", "8"),
    "lowrank_finetune": ("--device", "cpu", "--num-samples", "2", "--batch", "2", "--seq-len", "8"),
    "mezo_hf": ("--device", "cpu", "--dtype", "bfloat16", "--batch", "2", "--seq-len", "8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_an_example_resumed_from_its_journal_equals_a_straight_run(tmp_path, name):
    if name in ("lowrank_finetune", "mezo_hf"):
        pytest.importorskip("transformers")
    module = load_example(name)
    args = (*EXAMPLES[name], "--print-every", "100")
    straight, _ = run_main(module, *args, "--steps", "6", "--journal", str(tmp_path / "straight.zoj"))
    first, _ = run_main(module, *args, "--steps", "3", "--journal", str(tmp_path / "run.zoj"))
    resumed, out = run_main(module, *args, "--steps", "6", "--journal", str(tmp_path / "run.zoj"), "--resume")
    assert "replayed 3 steps" in out, out
    assert resumed == straight != first
    size = os.path.getsize(tmp_path / "run.zoj")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run_main(module, *args, "--steps", "6", "--journal", str(tmp_path / "run.zoj"))  # no --resume: refused
    assert os.path.getsize(tmp_path / "run.zoj") == size


@pytest.mark.parametrize("name", ["mezo_finetune", "mezo_hf"])
def test_an_example_refuses_to_journal_an_in_place_run(tmp_path, name):
    """In-place restores round in a way no record holds: such a run could not be replayed bit for bit."""
    module = load_example(name)
    err = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
        module.parse_args(["--journal", str(tmp_path / "run.zoj"), "--perturb", "inplace"])
    assert "--journal needs a run that replays bit for bit" in err.getvalue()
    assert not (tmp_path / "run.zoj").exists()
