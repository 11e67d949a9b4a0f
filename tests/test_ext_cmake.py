"""CMake build of the ops against libtorch + the C++ test executable (ctest). Slow (minutes), so it
only runs with -m slow."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_cmake_build_and_ctest(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    import torch

    build = tmp_path / "build"
    args = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    env = dict(os.environ)
    if torch.version.cuda:
        # A CUDA build of torch makes its CMake config look for the toolkit (and nvrtc, which a
        # bare toolkit may lack but torch's nvidia wheels ship); an explicit arch list skips GPU probing.
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={os.environ.get('CUDA_HOME', '/usr/local/cuda')}")
        nvrtc = glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "*", "lib",
                                       "libnvrtc.so*"))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    subprocess.run(args, check=True, env=env)
    subprocess.run(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")], check=True, env=env)
    out = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
