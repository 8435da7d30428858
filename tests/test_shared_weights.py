"""SharedWeights: a vmapped population on shared weights equals a loop over materialized members."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack

from zo_kernels.noise import shared_weights
from zo_kernels.noise.shared_weights import FAST_OPS, SharedWeights, materialized, reset_warnings

MEMBERS, RANK = 3, 2
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
OUR_WARNING = "zo_kernels: LowRank: `"


def population(shapes, dtype, scale=0.1):
    ws = [torch.randn(s, dtype=dtype) for s in shapes]
    As = [scale * torch.randn(MEMBERS, s[0], RANK, dtype=dtype) for s in shapes]
    Bs = [torch.randn(MEMBERS, math.prod(s) // s[0], RANK, dtype=dtype) for s in shapes]
    return ws, As, Bs


def vmapped(fn, ws, As, Bs):
    def member(a, b):
        with SharedWeights({id(w): (w, ai, bi) for w, ai, bi in zip(ws, a, b)}):
            return fn(*ws)

    return torch.func.vmap(member)(As, Bs)


def looped(fn, ws, As, Bs):
    return torch.stack([fn(*(materialized(w, a[i], b[i]) for w, a, b in zip(ws, As, Bs))) for i in range(MEMBERS)])


def warned_ops(caught):
    """The op names of our warnings, one entry per warning."""
    found = [str(w.message) for w in caught if str(w.message).startswith(OUR_WARNING)]
    return sorted(m[len(OUR_WARNING) :].split("`")[0] for m in found)


@pytest.fixture
def count_materialized(monkeypatch):
    """Counts the mode's calls of ``materialized`` (the loop's own calls go through the imported name)."""
    calls = []
    original = shared_weights.materialized
    monkeypatch.setattr(shared_weights, "materialized", lambda *a: calls.append(1) or original(*a))
    return calls


def run_both(fn, ws, As, Bs, count):
    """(vmapped, looped, our warnings' op names, calls of materialized by the mode)."""
    reset_warnings()
    expected = looped(fn, ws, As, Bs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = vmapped(fn, ws, As, Bs)
    return got, expected, warned_ops(caught), len(count)


# case name -> (weight shapes, make(dtype) -> fn(*weights), ops expected to warn)
CASES = {}


def case(*shapes, warns=(), name=None):
    def register(make):
        CASES[name or make.__name__] = (shapes, make, sorted(warns))
        return make

    return register


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


@case((8, 5), (3, 8))
def mlp_linear(dtype):
    # the first layer's input is not batched; the second's depends on the perturbed first layer
    x, b1, b2 = rand(6, 5, dtype=dtype), rand(8, dtype=dtype), rand(3, dtype=dtype)
    return lambda w1, w2: F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


@case((5, 7), (4, 7))
def matmul_chain(dtype):
    x = rand(2, 3, 5, dtype=dtype)
    return lambda w1, w2: torch.tanh(x @ w1) @ w2.T


@case((5, 4))
def matmul_vectors(dtype):
    u, v = rand(5, dtype=dtype), rand(4, dtype=dtype)
    return lambda w: torch.cat([u @ w, w @ v, torch.matmul(u, w), torch.matmul(w, v), w.__rmatmul__(u)])


@case((5, 4))
def mm_either_side(dtype):
    x, y = rand(3, 5, dtype=dtype), rand(4, 2, dtype=dtype)
    return lambda w: torch.cat([torch.mm(x, w).flatten(), w.mm(y).flatten(), x.matmul(w).flatten()])


@case((6, 4))
def addmm_conv1d(dtype):
    # HF GPT-2's Conv1D: weight (in, out), addmm(bias, x.view(-1, in), weight)
    x, bias, y = rand(2, 3, 6, dtype=dtype), rand(4, dtype=dtype), rand(4, 2, dtype=dtype)
    return lambda w: torch.cat(
        [
            torch.addmm(bias, x.view(-1, 6), w).flatten(),
            torch.addmm(bias, x.view(-1, 6), w, beta=0.5, alpha=2.0).flatten(),
            bias[:1].expand(6, 2).addmm(w, y, alpha=-1.5).flatten(),
        ]
    )


@case((10, 4))
def embedding_padding(dtype):
    ids = torch.tensor([[0, 3, 9], [0, 0, 1]])
    return lambda w: F.embedding(ids, w, padding_idx=0)


@case((10, 4))
def tied_embedding_and_head(dtype):
    # GPT-2's tying: one matrix is the token embedding and the output projection
    ids = torch.tensor([[2, 3, 9], [0, 5, 1]])
    return lambda w: F.linear(torch.tanh(F.embedding(ids, w)), w)


TRANSPOSES = {
    "W.T": lambda w: w.T,
    "W.t()": lambda w: w.t(),
    "torch.t": torch.t,
    "W.mT": lambda w: w.mT,
    "W.transpose(0, 1)": lambda w: w.transpose(0, 1),
    "W.transpose(-1, -2)": lambda w: w.transpose(-1, -2),
    "W.swapaxes(1, 0)": lambda w: w.swapaxes(1, 0),
    "W.permute(1, 0)": lambda w: w.permute(1, 0),
    "W.T.T": lambda w: w.T.T.T,
    "W.detach().T": lambda w: w.detach().T,
}
for _label, _view in TRANSPOSES.items():

    def _make(dtype, view=_view):
        x, z = rand(3, 4, dtype=dtype), rand(3, 5, dtype=dtype)
        return lambda w: torch.cat([(x @ view(w)).flatten(), F.linear(z, view(w)).flatten()])

    case((5, 4), name=f"x @ {_label}")(_make)


@case((5, 4))
def metadata_queries(dtype):
    x = rand(3, 5, dtype=dtype)

    def fn(w):
        m, n = w.shape
        assert (m, n) == tuple(w.size()) == (w.size(0), w.size(-1)) == (len(w), w.numel() // m)
        assert w.dim() == w.ndim == 2 and w.dtype == dtype and w.device.type == "cpu"
        assert w.is_contiguous() and w.stride() == (n, 1) and not w.requires_grad and w.is_floating_point()
        return x @ w.contiguous().to(dtype)

    return fn


@case((5, 4), warns=["pow"])
def penalty_pow(dtype):
    x = rand(3, 5, dtype=dtype)
    return lambda w: (x @ w).square().mean() + 1e-2 * w.pow(2).sum() + 1e-3 * w.pow(4).sum()


@case((4, 3, 3, 3), (2, 4), warns=["conv2d"])
def conv2d_4d_weight(dtype):
    img = rand(1, 3, 6, 6, dtype=dtype)
    return lambda k, w: F.linear(F.conv2d(img, k).mean((-1, -2)), w)


@case((5, 4), warns=["__getitem__"])
def getitem_row(dtype):
    x = rand(3, 4, dtype=dtype)
    return lambda w: torch.cat([x @ w[0], (x @ w.T).flatten()])


@case((10, 4), warns=["embedding"])
def embedding_max_norm(dtype):
    ids = torch.tensor([1, 3, 3, 7])
    return lambda w: F.embedding(ids, w, max_norm=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_materialized_loop(name, dtype, count_materialized):
    shapes, make, warns = CASES[name]
    ws, As, Bs = population(shapes, dtype)
    got, expected, warned, calls = run_both(make(dtype), ws, As, Bs, count_materialized)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    assert warned == warns  # exactly one warning per op that falls back, none otherwise
    assert (calls > 0) == bool(warns)


def test_warning_once_per_process_until_reset():
    shapes, make, _ = CASES["penalty_pow"]
    ws, As, Bs = population(shapes, torch.float32)
    fn = make(torch.float32)
    reset_warnings()
    with pytest.warns(UserWarning, match=r"`pow` uses a perturbed matrix"):
        vmapped(fn, ws, As, Bs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vmapped(fn, ws, As, Bs)
    assert warned_ops(caught) == []
    reset_warnings()
    with pytest.warns(UserWarning, match=r"`pow` uses a perturbed matrix"):
        vmapped(fn, ws, As, Bs)


def test_handler_runs_with_the_mode_disabled():
    # the rewrite's own matmuls must not re-enter the mode (TorchFunctionMode pops itself meanwhile)
    seen = []

    class Probe(SharedWeights):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append((func, len(_get_current_function_mode_stack())))
            return super().__torch_function__(func, types, args, kwargs)

    (w,), (A,), (B,) = population([(5, 4)], torch.float32)
    x = torch.randn(3, 4)

    def member(a, b):
        with Probe({id(w): (w, a, b)}):
            return F.linear(x, w)

    torch.func.vmap(member)(A, B)
    assert seen == [(F.linear, 0)]


class MemberError(Exception):
    pass


def test_exception_propagates_and_exits_the_mode():
    (w,), (A,), (B,) = population([(5, 4)], torch.float32)

    def fn(w):
        raise MemberError("from the member")

    with pytest.raises(MemberError, match="from the member"):
        vmapped(fn, [w], [A], [B])
    assert _get_current_function_mode_stack() == []


@pytest.mark.parametrize(
    "factors",
    [
        lambda w: {0: (w, torch.zeros(5, 2), torch.zeros(4, 2))},
        lambda w: {id(w): (w, torch.zeros(4, 2), torch.zeros(5, 2))},
        lambda w: {id(w): (w, torch.zeros(5, 2), torch.zeros(4, 3))},
    ],
    ids=["key-not-id", "factors-swapped", "ranks-differ"],
)
def test_factors_checked(factors):
    with pytest.raises(ValueError, match="SharedWeights"):
        SharedWeights(factors(torch.zeros(5, 4)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_weights_agree_to_their_precision(dtype):
    ws, As, Bs = population([(16, 8)], torch.float32)
    ws = [w.to(dtype) for w in ws]
    x = torch.randn(4, 8, dtype=dtype)
    fn = lambda w: F.linear(x, w)  # noqa: E731
    got, expected = vmapped(fn, ws, As, Bs), looped(fn, ws, As, Bs)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_materialized_rounds_once():
    W = torch.randn(6, 5, dtype=torch.bfloat16)
    A, B = torch.randn(6, 2), torch.randn(5, 2)
    exact = W.double() + A.double() @ B.double().T
    assert torch.equal(materialized(W, A, B), exact.float().to(torch.bfloat16))
    assert materialized(torch.zeros(2, 3, 4), torch.ones(2, 1), torch.ones(12, 1)).shape == (2, 3, 4)


def test_fast_ops_documented():
    assert FAST_OPS and all(isinstance(op, str) for op in FAST_OPS)


def module_case(model, inputs, kwargs=None):
    """fn over the model's 2-D parameters through functional_call, with those parameters as weights."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = [k for k, p in params.items() if p.ndim == 2]

    def fn(*ws):
        out = functional_call(model, {**params, **dict(zip(names, ws))}, inputs, kwargs)
        return out if isinstance(out, torch.Tensor) else out.loss

    return fn, [params[k] for k in names]


def perturbations(ws, scale):
    As = [scale * torch.randn(MEMBERS, w.shape[0], RANK) for w in ws]
    Bs = [torch.randn(MEMBERS, w.numel() // w.shape[0], RANK) for w in ws]
    return As, Bs


def test_nn_module_through_functional_call(count_materialized):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    fn, ws = module_case(model, (torch.randn(6, 5),))
    got, expected, warned, calls = run_both(fn, ws, *perturbations(ws, 0.1), count_materialized)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
    assert (warned, calls) == ([], 0)


def tiny_gpt2(transformers):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(transformers):
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_causal_lm_loss(build, count_materialized):
    transformers = pytest.importorskip("transformers")
    model = build(transformers).eval()
    ids = torch.randint(0, 100, (2, 8))
    fn, ws = module_case(model, (), dict(input_ids=ids, labels=ids))
    As, Bs = perturbations(ws, 1e-2)
    with torch.no_grad():
        got, expected, warned, calls = run_both(fn, ws, As, Bs, count_materialized)
        base = fn(*ws)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base.expand(MEMBERS), rtol=0, atol=1e-6)  # the perturbation reached the loss
    # every 2-D weight is rewritten, GPT-2's tied wte/lm_head included: nothing materialized
    assert (warned, calls) == ([], 0)
