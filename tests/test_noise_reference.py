"""The reference noise stream: Philox known answers, layout invariants, distribution moments."""

import math

import pytest
import torch

from zo_kernels import distributions
from zo_kernels.ops import reference

from helpers import assert_close

# Random123 kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words), expected (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    words = reference.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
    assert tuple(int(w) for w in words) == expected


def test_mulhilo_matches_python_integers():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 2**32, (10_000,), generator=g, dtype=torch.int64)
    for a in (reference.PHILOX_M0, reference.PHILOX_M1, 0xFFFFFFFF):
        hi, lo = reference.mulhilo32(a, x)
        for xv, h, lv in zip(x[:200].tolist(), hi[:200].tolist(), lo[:200].tolist()):
            assert (h << 32) | lv == a * xv
        assert int(hi.max()) < 2**32 and int(lo.max()) < 2**32 and int(lo.min()) >= 0


def test_counter_layout_is_the_documented_one():
    seed, sample, j = (0x0123456789ABCDEF, 5, 4 * (2**33 + 3) + 2)
    block = j // 4
    expected = reference.philox4x32(
        *(torch.tensor([w], dtype=torch.int64) for w in (block & 0xFFFFFFFF, block >> 32, sample, 0)),
        seed & 0xFFFFFFFF,
        seed >> 32,
    )
    words = torch.tensor([[int(w) for w in expected]], dtype=torch.int64)
    z = reference.box_muller(words)[0, 2]
    got = reference.noise("normal", seed, torch.tensor([sample]), j, 1)[0, 0]
    assert torch.equal(got, z)


@pytest.mark.parametrize("stream", reference.STREAMS)
def test_values_do_not_depend_on_how_the_vector_is_cut(stream):
    ids = torch.tensor([0, 3, 9])
    whole = reference.noise(stream, 99, ids, 0, 1000)
    for lo, hi in [(0, 1), (1, 7), (37, 50), (127, 129), (500, 1000)]:
        assert torch.equal(reference.noise(stream, 99, ids, lo, hi - lo), whole[:, lo:hi])
    assert torch.equal(reference.noise(stream, 99, ids[1:2], 0, 1000), whole[1:2])


def test_uniforms_are_exact_and_open():
    words = torch.tensor([0, 511, 512, 0xFFFFFFFF], dtype=torch.int64)
    u = reference.uniform_open01(words)
    assert u.dtype == torch.float32
    assert u.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, 1 - 2.0**-24]


def test_normal_moments():
    z = reference.noise("normal", 2024, torch.arange(4), 0, 250_000).double().reshape(-1)
    n = z.numel()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15) * se
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96) * se
    # Tail mass beyond 2 sigma: 4.55 %.
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002


def test_normals_match_float64_box_muller():
    words = reference.random_words(5, torch.tensor([[1]]), torch.arange(1000)[None, :])
    u = ((words >> 9).double() + 0.5) * 2.0**-23
    r = torch.sqrt(-2 * torch.log(u[..., 0::2]))
    t = 2 * math.pi * u[..., 1::2]
    exact = torch.stack((r * torch.cos(t), r * torch.sin(t)), -1).flatten(-2)
    assert torch.allclose(reference.box_muller(words).double(), exact, atol=2e-6, rtol=0)


def test_rademacher_signs_and_balance():
    z = reference.noise("rademacher", 3, torch.arange(2), 0, 100_000)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


def test_rademacher_bit_layout():
    words = reference.random_words(11, torch.tensor([[0]]), torch.tensor([[0]]))[0, 0]
    z = reference.noise("rademacher", 11, torch.tensor([0]), 0, 128)[0]
    for j in (0, 1, 31, 32, 77, 127):
        bit = (int(words[j // 32]) >> (j % 32)) & 1
        assert z[j].item() == (1.0 if bit else -1.0)


def test_sphere_sample_has_radius_sqrt_n():
    z = distributions.Sphere().sample((30, 7), seed=4)
    assert z.shape == (30, 7)
    assert math.isclose(torch.linalg.vector_norm(z.double()).item(), math.sqrt(210), rel_tol=1e-6)


@pytest.mark.parametrize("cls", [distributions.Normal, distributions.Rademacher, distributions.Sphere])
def test_builtin_sample_is_reproducible_under_manual_seed(cls):
    torch.manual_seed(5)
    a = cls().sample(torch.Size([3, 4]))
    torch.manual_seed(5)
    b = cls().sample(torch.Size([3, 4]))
    assert a.shape == (3, 4) and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_reference_perturb_reduce_step_agree_with_the_stream(dtype):
    theta = torch.randn(37, dtype=dtype)
    z = reference.noise("normal", 8, torch.arange(3), 10, 37)
    out = torch.full_like(theta, float("nan"))
    reference.perturb(out, theta, "normal", 8, 2, 0.5, 10)
    acc = reference.accumulation_dtype(dtype)
    assert torch.equal(out, (theta.to(acc) + 0.5 * z[2].to(acc)).to(dtype))
    w = torch.tensor([0.5, -1.0, 2.0], dtype=acc)
    grad = torch.ones(37, dtype=dtype)
    reference.reduce(grad, w, torch.arange(3), "normal", 8, 10)
    expected = 1 + (w[:, None] * z.to(acc)).sum(0)
    assert_close(grad, expected, dtype)
    stepped = theta.clone()
    reference.step(stepped, w, torch.arange(3), "normal", 8, 0.1, 10)
    assert_close(stepped, theta.to(acc) - 0.1 * (w[:, None] * z.to(acc)).sum(0), dtype)


def test_squared_norms():
    ids = torch.tensor([0, 5])
    z = reference.noise("normal", 1, ids, 0, 999).double()
    assert torch.allclose(reference.squared_norms("normal", 1, ids, 999), (z * z).sum(1))


def test_large_offsets_need_no_large_allocation():
    z = reference.noise("normal", 1, torch.tensor([0]), 2**31 + 5, 3)
    y = reference.noise("normal", 1, torch.tensor([0]), 2**31 + 4, 4)
    assert torch.equal(z[0], y[0, 1:])
    big = reference.noise("rademacher", 1, torch.tensor([1]), 2**40 - 1, 2)
    assert big.shape == (1, 2)


def test_seed_must_fit_64_bits():
    with pytest.raises(ValueError, match="seed"):
        reference.noise("normal", 2**64, torch.tensor([0]), 0, 4)
