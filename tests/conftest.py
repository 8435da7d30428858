import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. The variable is read when
# a kernel is defined, so it must be set before zo_kernels (and its Triton modules) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from zo_kernels import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test starts from a fixed RNG so failures reproduce, and leaves no state behind."""
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    yield
    torch.random.set_rng_state(state)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CPU_BACKENDS = [name for name in ("reference", "cpu") if backends.available()[name] == "available"]


@pytest.fixture(params=CPU_BACKENDS)
def each_cpu_backend(request, monkeypatch):
    """Run a test once per backend that serves CPU tensors, forced through $ZO_KERNELS_BACKEND."""
    monkeypatch.setenv("ZO_KERNELS_BACKEND", request.param)
    return request.param
