"""Build script: pure-Python package + the optional compiled extension ``senformer._C``.

The extension needs torch at build time, so install with ``--no-build-isolation`` after torch
(the README's command does this). Without torch importable here the package still installs,
pure Python, and ``senformer.ops`` falls back to the Triton / reference backends.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SENFORMER_SKIP_EXT_BUILD") == "1":
        return [], {}
    cpu_src = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_src:
        return [], {}
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    from build_ext_config import detect_cuda_home, make_extensions  # noqa: E402  (csrc/build_ext_config.py)

    cuda_home = detect_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    try:
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("senformer: torch is not importable at build time; building without senformer._C "
              "(install torch first and use --no-build-isolation to get the compiled kernels)", file=sys.stderr)
        return [], {}
    exts = make_extensions(ce, cpu_src, cuda_home)
    return exts, {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["senformer", "senformer.*"]) + ["senformer.kernels"],
    package_dir={"senformer.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
