"""Test-wide setup: where Triton runs, strict backends, and the ``gpu`` / ``slow`` markers.

- Triton runs on the GPU when there is one and through its CPU interpreter otherwise
  (``TRITON_INTERPRET`` must be decided before triton is imported anywhere; an explicit value wins).
- ``SENFORMER_STRICT_BACKEND=1``: a test that forces a backend which cannot take its tensors fails
  with ``BackendUnavailable`` instead of passing on the reference.
- ``gpu`` tests (paper-sized shapes on CUDA) are skipped without CUDA; ``slow`` tests run only when
  selected with ``-m slow`` (or ``-m gpu`` on a GPU machine, or ``--run-slow``).
"""
import os
import re

import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if HAS_CUDA else "1")
os.environ.setdefault("SENFORMER_STRICT_BACKEND", "1")

import pytest  # noqa: E402

pytest_plugins = ["pytester"]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    # selecting slow or gpu tests by marker opts into them ("not slow" does not)
    run_slow = config.getoption("--run-slow") or re.search(r"(?<!not )\b(slow|gpu)\b", markexpr) is not None
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow: opt-in with -m slow or --run-slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
