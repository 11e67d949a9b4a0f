"""CMake build of the ops against libtorch + the C++ test executable (ctest). Slow (minutes), so it
only runs with SENFORMER_TEST_CMAKE=1."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.environ.get("SENFORMER_TEST_CMAKE") != "1",
                                reason="set SENFORMER_TEST_CMAKE=1 to build with CMake and run ctest")


def test_cmake_build_and_ctest(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    import torch

    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")], check=True)
    out = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
