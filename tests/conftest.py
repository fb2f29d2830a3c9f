"""Shared fixtures. Every kernel is tested against anisodiff.reference on the same noise stream."""
import os
import shutil

# Triton kernels run through the interpreter on machines without a GPU. This must be set before
# anything imports triton (importing torch.library machinery does), i.e. before torch/anisodiff.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import anisodiff as ad


def pytest_report_header(config):
    return f"anisodiff build: {ad.build_info()}"


@pytest.fixture(scope="session")
def schedule():
    return ad.VPSchedule.linear(T=1000)


def random_axes(C: int, k: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal [C, k] axes (float64), deterministic."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    return q[:, :k].contiguous()


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Keep tests deterministic in the face of other tests changing torch's thread count."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


requires_compiled = pytest.mark.skipif(not ad.build_info().get("cpu"),
                                       reason="compiled CPU ops not built")
requires_triton = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed")
IN_CI = os.environ.get("CI") == "true"
