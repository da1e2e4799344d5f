import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter, which triton reads when it is
# imported: set it before anything imports fastattn (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, with the reason, when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, " \
           f"CUDA devices: {torch.cuda.device_count()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
