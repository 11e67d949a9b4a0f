"""csrc/build_ext_config.py: which extension a build makes, without building one."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
import build_ext_config as cfg  # noqa: E402


class _Ext:
    """Stands in for torch.utils.cpp_extension: records which kind of extension was asked for."""

    def CUDAExtension(self, name, sources, **kw):
        return ("cuda", name, sources)

    def CppExtension(self, name, sources, **kw):
        return ("cpp", name, sources)


@pytest.fixture
def toolkit(monkeypatch, tmp_path):
    cu = tmp_path / "csrc" / "cuda"
    cu.mkdir(parents=True)
    (cu / "k.cu").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SENFORMER_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;9.0")
    return "/opt/cuda-stand-in"


def test_cuda_build_when_torch_and_nvcc_agree(monkeypatch, toolkit):
    monkeypatch.setattr(cfg, "nvcc_version", lambda home: (13, 0))
    monkeypatch.setattr(cfg, "_torch_cuda_version", lambda: (13, 0))
    (kind, name, sources), = cfg.make_extensions(_Ext(), ["csrc/a.cpp"], toolkit)
    assert kind == "cuda" and name == "senformer._C" and sources[-1].endswith("k.cu")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # CUDA 13 has no sm_70: dropped, not fatal


@pytest.mark.parametrize("torch_cuda", [None, (12, 8)])
def test_cpu_only_build_for_a_cpu_torch_or_another_cuda_major(monkeypatch, toolkit, torch_cuda, capsys):
    monkeypatch.setattr(cfg, "nvcc_version", lambda home: (13, 0))
    monkeypatch.setattr(cfg, "_torch_cuda_version", lambda: torch_cuda)
    (kind, _, sources), = cfg.make_extensions(_Ext(), ["csrc/a.cpp"], toolkit)
    assert kind == "cpp" and sources == ["csrc/a.cpp"]
    assert "CPU kernels only" in capsys.readouterr().err


def test_detect_cuda_home_prefers_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert cfg.detect_cuda_home() == str(tmp_path)
