"""Every CUDA source compiles with nvcc for sm_90, cleanly, and keeps the accurate math (no GPU needed)."""

import ctypes
import dataclasses
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

from zo_kernels.ops import reference
from zo_kernels.ops.native import NativeCudaBackend, load_backend, load_extension
from zo_kernels.ops.spec import ABI_VERSION, DTYPE_IDS, STREAM_IDS, Placement

from helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
# The kernels; emulation.cu (the host harness below, which includes kernels.cu) is built by its fixture.
SOURCES = sorted(p for p in glob.glob(os.path.join(CSRC, "cuda", "*.cu")) if not p.endswith("emulation.cu"))
CUDA_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*"))) + [os.path.join(ROOT, "CMakeLists.txt")]

# Fast-math intrinsics and flags would move the normals away from the reference by far more than 1e-6.
FAST_MATH = re.compile(r"__(sin|cos|sincos|log|log2|log10|exp|exp10|pow|tan|fdividef)f\s*\(|use_fast_math|ftz=true")
# PTX instructions that only fast math produces here (the accurate sqrtf is sqrt.rn).
APPROX_PTX = re.compile(r"\b(sin|cos|lg2|ex2|sqrt|rsqrt)\.approx")


def _nvcc():
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu is empty"


def test_the_built_extension_imports_without_a_gpu_and_explains_availability():
    ext, why = load_extension("cuda")
    backend, reason = load_backend("cuda")
    if ext is None:  # not built, or built from older sources (a reinstall is due): said so either way
        assert why.startswith(("not built", "stale build")) and backend is None and reason == why
        pytest.skip(why)
    # The CUDA runtime is linked statically: importing needs no libcudart and no driver.
    assert ext.ABI_VERSION == ABI_VERSION and ext.MIN_ARCH >= 750 and ext.CUDART_VERSION >= 11000
    assert ext.squared_norms_workspace(3, 65537) == 3 * 2
    assert ext.sample_splits(1000, 256, 0) == 62 and ext.reduce_workspace(1000, 256, 0) == 62 * 256
    assert ext.sample_splits(0, 256, 0) == 0 and ext.reduce_workspace(1000, 2**22, 0) == 0
    if not torch.cuda.is_available():
        assert backend is None and reason.startswith("built, but no CUDA device is visible"), reason
    else:
        assert (backend is None) == (reason != "available"), reason


def test_python_layer_refuses_cpu_tensors_before_any_call():
    class Fail:
        MIN_ARCH = 800

        def __getattr__(self, name):
            def call(*args):
                raise AssertionError(f"the extension must not be called ({name})")

            return call

    backend = NativeCudaBackend(Fail())
    assert not backend.supports(torch.device("cpu"), torch.float32)
    assert not backend.supports(torch.device("cuda", 0), torch.int32)
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="CUDA tensor"):
        backend.perturb(x, x, "normal", 0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        backend.prepare_perturb(x, x, "normal", 0, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        backend.reduce(x, torch.ones(1), torch.zeros(1, dtype=torch.int64), "normal", 0, 0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        backend.step(x, torch.ones(1), torch.zeros(1, dtype=torch.int64), "normal", 0, 0.1, 0)
    with pytest.raises(ValueError, match="device must be a cuda device"):
        backend.sample("normal", 0, 0, 0, 4, "cpu")


def test_the_adapters_calls_fit_the_cuda_bindings():
    """Every call the adapter makes reaches _C_cuda's CUDA runtime (no pybind11 TypeError): the argument
    lists of kernels/native.py fit csrc/bindings.h. Without a driver the runtime refuses; with a GPU the
    host pointers used here would be launched, so the test only runs without one."""
    ext, why = load_extension("cuda")
    if ext is None:
        pytest.skip(why)
    if torch.cuda.is_available():
        pytest.skip("with a GPU, tests/test_cuda_kernels.py runs these calls for real")
    backend = NativeCudaBackend(ext)
    # host tensors pass the checks, and reach the bindings with a launch tuple
    placement = Placement("cuda", ("cpu",), "on the CPU (this test)")
    on_cpu = dict(placement=placement, default_device=lambda: torch.device("cpu"))
    backend.traits = dataclasses.replace(backend.traits, **on_cpu)
    backend._launch = lambda device: (0, 0)
    t, ids, w, f64 = torch.zeros(4), torch.arange(2), torch.ones(2), torch.float64
    calls = [
        lambda b: b.perturb(t, t, "normal", 0, 0, 1.0, 0),
        lambda b: b.prepare_perturb(t, t, "normal", 0, 0)(1, 1.0),
        lambda b: b.perturb_rows(torch.zeros(4, 4), t, "normal", 0, ids, torch.ones(2, 2, dtype=f64), 0),
        lambda b: b.reduce(t, w, ids, "normal", 0, 0),
        lambda b: b.step(t, w, ids, "normal", 0, 0.1, 0),
        lambda b: b.reduce(torch.zeros(256), torch.ones(1000), torch.arange(1000), "normal", 0, 0),  # split
        lambda b: b.squared_norms("normal", 0, ids, 10),
        lambda b: b.sample("normal", 0, 0, 0, 10),
        lambda b: b.philox_words(0, 0, 0, 2),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="zo_kernels._C_cuda: cuda"):
            call(backend)


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_compiles_for_sm90_without_warnings(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [
        nvcc, "-std=c++17", "-arch=sm_90", "-O3", "-c", source, "-I", CSRC, "-o", str(tmp_path / "out.o"),
        "--keep", "--keep-dir", str(tmp_path),  # keeps the PTX for the check below
        "-Xptxas=-warn-spills",  # a register spill in a kernel is a performance bug
        "-Xcompiler=-Wall,-Wextra,-Wno-unknown-pragmas",  # reference.h's `#pragma unroll` is for nvcc
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed on {source}:\n{output[-6000:]}"
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not warnings, f"nvcc warnings for {source}:\n" + "\n".join(warnings)
    ptx = glob.glob(str(tmp_path / "*.ptx"))
    assert ptx, "nvcc --keep left no PTX"
    for path in ptx:
        with open(path, encoding="utf-8") as f:
            approx = sorted(set(APPROX_PTX.findall(f.read())))
        assert not approx, f"{source}: approximate math instructions in the PTX: {approx}"


@pytest.mark.parametrize("path", CUDA_FILES, ids=os.path.basename)
def test_no_fast_math(path):
    with open(path, encoding="utf-8") as f:
        code = f.read()
    comment = r"#[^\n]*" if path.endswith(".txt") else r"//[^\n]*|/\*.*?\*/"
    code = re.sub(comment, "", code, flags=re.S)  # comments may warn against fast math
    found = FAST_MATH.search(code)
    assert found is None, f"{path} uses fast math: {found.group(0)!r}"


# --- The kernels' work items, run on the CPU -------------------------------------------------------
#
# csrc/cuda/kernels.cu keeps each thread's work (one group of elements) in __host__ __device__
# functions. This harness includes that file and runs those functions item by item on the CPU with
# the kernels' grid-stride schedule (and the squared norms' tree order), so the indexing, head/tail
# handling, vectorized and scalar paths, dtype conversions and summation order are checked against
# the reference without a GPU. Only the math library differs (glibc here, CUDA's on the device).

#: The harness: csrc/cuda/emulation.cu, next to the kernels it includes.
HARNESS = os.path.join(CSRC, "cuda", "emulation.cu")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    work = tmp_path_factory.mktemp("emu")
    lib = work / "libharness.so"
    cmd = [
        nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler=-fPIC", "-I", CSRC, HARNESS, "-o", str(lib),
        "-gencode", "arch=compute_90,code=compute_90",  # PTX only: the device code is not what runs here
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"harness build failed:\n{(result.stdout + result.stderr)[-6000:]}"
    h = ctypes.CDLL(str(lib))
    P, INT, I64, U64, U32, D = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                              ctypes.c_double)  # fmt: skip
    h.emu_set_blocks.argtypes = [INT]
    h.emu_groups.argtypes, h.emu_groups.restype = [INT, I64, I64], I64
    h.emu_perturb.argtypes = [P, P, I64, INT, INT, U64, U32, D, I64]
    h.emu_perturb_rows.argtypes = [P, P, I64, INT, INT, U64, P, I64, P, INT, I64]
    h.emu_accumulate.argtypes = [P, I64, INT, P, P, I64, INT, U64, I64, D, INT]
    h.emu_split.argtypes = h.plain_split.argtypes = [P, I64, INT, P, P, I64, INT, U64, I64, D, INT, I64]
    h.emu_reduce.argtypes = [P, I64, INT, P, P, I64, INT, U64, I64, D, INT]
    h.emu_sample_splits.argtypes, h.emu_sample_splits.restype = [I64, I64, INT], I64
    h.emu_fill.argtypes = [P, I64, INT, U64, U32, I64]
    h.emu_squared_norms.argtypes = [P, P, I64, I64, INT, U64]
    return h


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 127, 128, 129, 2049, 5000]


def _shifted_cpu(values, shift):
    storage = torch.full((values.numel() + shift + 1,), float("nan"), dtype=values.dtype)
    view = storage[shift : shift + values.numel()]
    view.copy_(values)
    return view


def test_emulated_group_count(emu):
    for stream, g in ((0, 4), (1, 32)):
        for n in (1, 2, 15, 16, 17, 1000):
            for offset in (0, 1, 3, 4, 15, 16, 17, 31, 32, 33, 2**40 + 9):
                first, last = offset // g, (offset + n - 1) // g
                assert emu.emu_groups(stream, n, offset) == last - first + 1


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("stream", ["normal", "rademacher"])
@pytest.mark.parametrize("shift", [0, 1])
def test_emulated_perturb_matches_the_reference(emu, dt, stream, shift):
    for n in SIZES:
        for offset in (0, 5, 16 * 12345, 2**31 + 3):
            theta = _shifted_cpu(torch.randn(n, dtype=torch.float64).to(dt), shift)
            out = _shifted_cpu(torch.full((n,), float("nan"), dtype=dt), shift)
            emu.emu_perturb(
                out.data_ptr(), theta.data_ptr(), n, DTYPE_IDS[dt], STREAM_IDS[stream], 42, 9, -0.37, offset
            )
            ref = torch.empty_like(theta)
            reference.perturb(ref, theta, stream, 42, 9, -0.37, offset)
            assert_close(out, ref, dt)
            emu.emu_perturb(theta.data_ptr(), theta.data_ptr(), n, DTYPE_IDS[dt], STREAM_IDS[stream], 42, 9, -0.37,
                            offset)  # fmt: skip
            assert torch.equal(theta, out)  # in place gives the same bits


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("signs", [1, 2])
def test_emulated_perturb_rows_matches_the_reference(emu, dt, stream, signs):
    for n in (1, 129, 2049):
        theta = torch.randn(n, dtype=torch.float64).to(dt)
        offset = int(torch.randint(0, 2**33, ()).item())
        ids = torch.randperm(40)[:3]
        scales = torch.randn(3, signs, dtype=torch.float64)
        out = torch.full((3 * signs, n), float("nan"), dtype=dt)  # poison: every row must be written
        emu.emu_perturb_rows(
            out.data_ptr(), theta.data_ptr(), n, DTYPE_IDS[dt], STREAM_IDS[stream], 42, ids.data_ptr(), 3,
            scales.data_ptr(), signs, offset,
        )  # fmt: skip
        for i in range(3):
            for k in range(signs):
                ref = torch.empty_like(theta)
                reference.perturb(ref, theta, stream, 42, int(ids[i]), float(scales[i, k]), offset)
                assert_close(out[i * signs + k], ref, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("stream", ["normal", "rademacher"])
@pytest.mark.parametrize("shift", [0, 1])
def test_emulated_reduce_and_step_match_the_reference(emu, dt, stream, shift):
    acc = reference.accumulation_dtype(dt)
    num = 13
    ids = torch.randperm(40)[:num].to(torch.int64)
    weights = torch.randn(num, dtype=torch.float64)
    w = weights.to(acc)
    for n in SIZES:
        for offset in (0, 5, 16 * 777, 2**33 + 125):
            start = torch.randn(n, dtype=torch.float64).to(dt)
            expected = start.to(acc) + reference.combine(weights, ids, stream, 5, offset, n, dt)
            grad = _shifted_cpu(start, shift)
            emu.emu_accumulate(grad.data_ptr(), n, DTYPE_IDS[dt], w.data_ptr(), ids.data_ptr(), num,
                               STREAM_IDS[stream], 5, offset, 1.0, 0)  # fmt: skip
            assert_close(grad, expected, dt, scale=4)
            for lr in (0.5, 1.0):
                theta = _shifted_cpu(start, shift)
                emu.emu_accumulate(theta.data_ptr(), n, DTYPE_IDS[dt], w.data_ptr(), ids.data_ptr(), num,
                                   STREAM_IDS[stream], 5, offset, lr, 1)  # fmt: skip
                assert_close(theta, start.to(acc) - lr * (expected - start.to(acc)), dt, scale=4)


def test_emulated_vector_and_scalar_paths_agree_bitwise(emu):
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        acc = torch.float64 if dt == torch.float64 else torch.float32
        for stream in ("normal", "rademacher"):
            values = torch.randn(777, dtype=torch.float64).to(dt)
            w, ids = torch.randn(3, dtype=acc), torch.tensor([0, 5, 6])
            for offset in (0, 16, 19):
                grads = []
                for shift in (0, 1, 2, 3):
                    g = _shifted_cpu(values, shift)
                    emu.emu_accumulate(g.data_ptr(), 777, DTYPE_IDS[dt], w.data_ptr(), ids.data_ptr(), 3,
                                       STREAM_IDS[stream], 1, offset, 1.0, 0)  # fmt: skip
                    grads.append(g.clone())
                assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_emulated_out_of_range_ids_poison(emu):
    grad = torch.zeros(50)
    w, ids = torch.ones(2), torch.tensor([1, 2**32])
    emu.emu_accumulate(grad.data_ptr(), 50, 0, w.data_ptr(), ids.data_ptr(), 2, 0, 0, 0, 1.0, 0)
    assert bool(torch.isnan(grad).all())


def test_emulated_perturb_rows_poisons_the_rows_of_out_of_range_ids(emu):
    out = torch.zeros(6, 64)
    ids, scales = torch.tensor([3, 2**32, -1]), torch.ones(3, 2, dtype=torch.float64)
    emu.emu_perturb_rows(out.data_ptr(), torch.zeros(64).data_ptr(), 64, 0, 0, 0, ids.data_ptr(), 3,
                         scales.data_ptr(), 2, 0)  # fmt: skip
    assert not bool(torch.isnan(out[:2]).any()) and bool(torch.isnan(out[2:]).all())


# --- The split reduce/step (samples in chunks over gridDim.y) ---------------------------------------

G = {"normal": 4, "rademacher": 32}


def _splits(num, n, stream):
    """The rule of sample_splits (csrc/cuda/kernels.h), restated."""
    if num <= 0 or n <= 0:
        return 0
    threads = -(-n // G[stream])
    return max(1, min(132 * 2048 // threads, num // 16, (64 << 20) // 8 // n, 65535))


def _accumulate(emu, fn, start, weights, ids, stream, offset, lr, subtract, *chunks):
    data = start.clone()
    fn(data.data_ptr(), data.numel(), DTYPE_IDS[data.dtype], weights.data_ptr(), ids.data_ptr(), ids.numel(),
       STREAM_IDS[stream], 5, offset, lr, subtract, *chunks)  # fmt: skip
    return data


def _inputs(dt, num, n):
    acc = reference.accumulation_dtype(dt)
    weights = (torch.randn(num, dtype=torch.float64) / num).to(acc)
    return torch.randn(n, dtype=torch.float64).to(dt), weights, torch.randperm(4 * num)[:num]


def test_sample_splits_rule(emu):
    cases = [(0, 256), (1000, 0), (31, 256), (32, 256), (1000, 256), (1000, 4096), (1000, 2**16), (1000, 2**20)]
    cases += [(10**6, 1), (10**6, 300), (2**20, 2**22), (64, 10**6), (5000, 2049)]
    for stream in reference.STREAMS:
        for num, n in cases:
            k = emu.emu_sample_splits(num, n, STREAM_IDS[stream])
            assert k == _splits(num, n, stream), (stream, num, n)
            assert k == 0 or num // k >= 16 or k == 1
            assert k * n * 8 <= 64 << 20 or k == 1
    assert emu.emu_sample_splits(1000, 256, 0) == 62  # a bias at N = 1000: 62 chunks of 16 samples
    assert emu.emu_sample_splits(1000, 2**22, 0) == 1  # a large tensor has the threads already


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_emulated_split_follows_the_plain_sequential_order_bitwise(emu, dt, stream):
    # Per chunk the samples in order from +0, then the chunks in order: written out element by element
    # with reference.h alone (plain_split), the kernels' work items must give the same bits.
    for num, n in ((40, 1), (40, 131), (37, 2049)):
        start, weights, ids = _inputs(dt, num, n)
        for chunks in (1, 2, 3, 7, num):
            for offset, subtract, lr in ((0, 0, 1.0), (5, 1, 0.5), (2**33 + 125, 0, 1.0), (16 * 777 + 3, 1, 1.0)):
                got = _accumulate(emu, emu.emu_split, start, weights, ids, stream, offset, lr, subtract, chunks)
                want = _accumulate(emu, emu.plain_split, start, weights, ids, stream, offset, lr, subtract, chunks)
                assert torch.equal(got, want), (num, n, chunks, offset, subtract)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
@pytest.mark.parametrize("shift", [0, 1])
def test_emulated_split_with_one_chunk_is_the_single_kernel_path(emu, dt, stream, shift):
    start, weights, ids = _inputs(dt, 13, 2049)
    for offset in (0, 5, 2**33 + 125):
        for subtract, lr in ((0, 1.0), (1, 0.5)):
            base = _shifted_cpu(start, shift)
            one = _accumulate(emu, emu.emu_split, base, weights, ids, stream, offset, lr, subtract, 1)
            single = _accumulate(emu, emu.emu_accumulate, base, weights, ids, stream, offset, lr, subtract)
            assert torch.equal(one, single)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("stream", reference.STREAMS)
def test_emulated_split_matches_the_reference(emu, dt, stream):
    acc = reference.accumulation_dtype(dt)
    num, n = 1000, 256  # a bias at N = 1000: the rule splits it (62 chunks)
    start, weights, ids = _inputs(dt, num, n)
    assert emu.emu_sample_splits(num, n, STREAM_IDS[stream]) == 62
    for offset in (0, 7, 2**31 + 3):
        total = reference.combine(weights, ids, stream, 5, offset, n, dt)
        for chunks in (2, 5, 62):
            got = _accumulate(emu, emu.emu_split, start, weights, ids, stream, offset, 1.0, 0, chunks)
            assert_close(got, start.to(acc) + total, dt, scale=4)
        reduced = _accumulate(emu, emu.emu_reduce, start, weights, ids, stream, offset, 1.0, 0)
        assert torch.equal(reduced, _accumulate(emu, emu.emu_split, start, weights, ids, stream, offset, 1.0, 0, 62))
        stepped = _accumulate(emu, emu.emu_reduce, start, weights, ids, stream, offset, 0.5, 1)
        assert_close(stepped, start.to(acc) - 0.5 * total, dt, scale=4)


@pytest.mark.parametrize("stream", reference.STREAMS)
def test_emulated_split_poisons_out_of_range_ids(emu, stream):
    start, weights, ids = _inputs(torch.float32, 64, 300)
    for bad in (2**32, -1):
        ids_bad = ids.clone()
        ids_bad[40] = bad  # in chunk 2 of 3: the other chunks' partial sums are finite
        got = _accumulate(emu, emu.emu_split, start, weights, ids_bad, stream, 3, 1.0, 0, 3)
        assert bool(torch.isnan(got).all())


@pytest.mark.parametrize("dt", DTYPES)
def test_emulated_reduce_and_step_with_no_samples_touch_nothing(emu, dt):
    start = torch.randn(300, dtype=torch.float64).to(dt)
    start[::3] = -0.0
    nothing = torch.empty(0, dtype=reference.accumulation_dtype(dt)), torch.empty(0, dtype=torch.int64)
    for subtract in (0, 1):
        got = _accumulate(emu, emu.emu_reduce, start, *nothing, "normal", 0, 0.1, subtract)
        assert torch.equal(got, start) and bool(torch.signbit(got[::3]).all())  # -0.0 stays -0.0
    # Why the host functions return before launching: one pass adding the empty sum (+0.0) would not.
    launched = _accumulate(emu, emu.emu_accumulate, start, *nothing, "normal", 0, 1.0, 0)
    assert not bool(torch.signbit(launched[::3]).any())


@pytest.mark.parametrize("stream", ["normal", "rademacher"])
def test_emulated_fill_and_squared_norms_match_the_reference(emu, stream):
    for n, offset in ((1, 0), (131, 3), (4099, 2**34 + 127)):
        out = torch.full((n,), float("nan"))
        emu.emu_fill(out.data_ptr(), n, STREAM_IDS[stream], 77, 3, offset)
        torch.testing.assert_close(out, reference.noise(stream, 77, torch.tensor([3]), offset, n)[0], rtol=0, atol=1e-6)
    ids = torch.tensor([0, 4, 17])
    for n in (0, 1, 2049, 2 * 65536 + 77):
        out = torch.full((3,), float("nan"), dtype=torch.float64)
        emu.emu_squared_norms(out.data_ptr(), ids.data_ptr(), 3, n, STREAM_IDS[stream], 3)
        torch.testing.assert_close(out, reference.squared_norms(stream, 3, ids, n), rtol=1e-6, atol=1e-6)
