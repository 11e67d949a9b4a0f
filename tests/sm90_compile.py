"""Offline sm_90 (Hopper) compile of every shipped Triton kernel config, with ptxas's register/spill report.

No GPU is needed: each launcher in ``senformer.kernels`` is *called* (on CPU tensors of paper shapes)
with its kernel launches intercepted, so the launches recorded are exactly those the GPU path would
make -- its own config functions pick BLOCK sizes, num_warps and num_stages, and an autotuned kernel
contributes every config of its tuner. Each distinct launch is then specialised as triton's JIT would
specialise it (pointer alignment, integers equal to 1 or divisible by 16), compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, and its PTX is assembled once more by triton's own
ptxas with ``-v`` (same flags as the nvidia backend) to read "Used N registers" and the spill bytes.

    python tests/sm90_compile.py                 # table: kernel / config / registers / spills
    python tests/sm90_compile.py --fast          # the subset the default test suite compiles
    python tests/sm90_compile.py -k bmm --json   # filter by substring of the case id; JSON output
    python tests/sm90_compile.py -k _tiled_ -k BLOCK_D=128   # every substring must match

Registers and spills depend on the triton release (its ptxas and its lowering): the GPU machine
compiles with triton 3.6, so CI's floor leg also runs the default subset there; for the whole grid
on that stack run this script from a venv of ``torch==2.11.* triton==3.6.*``.

``tests/test_sm90_compile.py`` asserts 0 spill bytes for every case.  Adding a kernel or a variant to
a launcher needs nothing here; adding a new *scenario* (shape family, flag) means one more entry in
``SCENARIOS`` (for attention: ``_attention_scenarios``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPER_N = (19, 59, 150, 171)          # Cityscapes, Pascal-Context, ADE20K, COCO-Stuff
ATTN_N = PAPER_N + (1024,)
ATTN_D = (32, 64, 128)                # 64 = d 512 / 8 heads, the paper's
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def kernel_module(op: str):
    """``senformer.kernels.<op>``, or ``kernels.<op>`` from the checkout when senformer is not installed."""
    try:
        return importlib.import_module(f"senformer.kernels.{op}")
    except ImportError:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        return importlib.import_module(f"kernels.{op}")


# ------------------------------------------------------------------------------------------------
# Recording launches

def _int_kind(v: int) -> str:
    """The part of an integer argument triton's JIT specialises on."""
    if v == 1:
        return "one"
    width = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    return width + ("/16" if v % 16 == 0 else "")


_INT_EXAMPLE = {"one": 1, "i32/16": 16, "i32": 17, "i64/16": 2 ** 33, "i64": 2 ** 33 + 1}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
          "uint8": "u8", "int8": "i8", "int16": "i16", "bool": "i1"}


def _encode(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", _int_kind(value))
    if isinstance(value, float):
        return ("float",)
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _raw(fn):
    """The Python function behind a JITFunction / InterpretedFunction / Autotuner (nested)."""
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the compiler sees it (grid and data left out)."""
    module: str                 # importable module of the kernel
    name: str                   # kernel function name
    params: tuple               # ((param name, encoded value), ...) in signature order
    constexprs: tuple           # ((name, value), ...) of the constexpr params, for labels
    options: tuple              # ((num_warps, 8), (num_stages, 3), ...)

    @property
    def kernel(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.name}"

    def config(self) -> str:
        runs: list = []   # pointer dtypes in argument order, runs compressed: "bf16*4,fp32*3"
        for _, v in self.params:
            if v[0] == "tensor":
                d = _SHORT.get(v[1], v[1]) + ("" if v[2] else "(unaligned)")
                if runs and runs[-1][0] == d:
                    runs[-1][1] += 1
                else:
                    runs.append([d, 1])
        ptrs = ",".join(d if n == 1 else f"{d}*{n}" for d, n in runs)
        parts = [f"{k}={v}" for k, v in self.constexprs]
        parts += [f"{k.replace('num_', '')}={v}" for k, v in self.options]
        return f"{ptrs} " + " ".join(parts)

    def key(self) -> str:
        return hashlib.sha1(repr((self.module, self.name, self.params, self.options)).encode()).hexdigest()[:8]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Launch":
        tup = lambda xs: tuple(tuple(x) if isinstance(x, list) else x for x in xs)  # noqa: E731
        return cls(d["module"], d["name"],
                   tuple((n, tup(v)) for n, v in d["params"]),
                   tuple((n, v) for n, v in d["constexprs"]),
                   tuple((n, v) for n, v in d["options"]))


_signature = __import__("functools").lru_cache(maxsize=None)(inspect.signature)


def _make_launch(fn, args, kwargs, extra_options=None) -> Launch:
    import triton.language as tl

    raw = _raw(fn)
    sig = _signature(raw)
    kernel_kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    options.update(extra_options or {})
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"{raw.__name__}: launch keywords {sorted(unknown)} are neither parameters nor options")
    bound = sig.bind(*args, **kernel_kwargs)
    bound.apply_defaults()
    params, constexprs = [], []
    for name, value in bound.arguments.items():
        ann = sig.parameters[name].annotation
        is_constexpr = ann is tl.constexpr or ann == "tl.constexpr" or "constexpr" in str(ann)
        if is_constexpr:
            params.append((name, ("const", value)))
            constexprs.append((name, value))
        else:
            params.append((name, _encode(value)))
    defaults = {"num_ctas": 1, "maxnreg": None}   # dropped when default, so configs compare equal
    options = {k: v for k, v in options.items() if v is not None and defaults.get(k, 0) != v}
    return Launch(raw.__module__, raw.__name__, tuple(params), tuple(constexprs),
                  tuple(sorted(options.items(), key=lambda kv: OPTION_NAMES.index(kv[0]))))


@contextlib.contextmanager
def recording(launches: list):
    """Within: every ``kernel[grid](...)`` appends its Launch(es) to ``launches`` instead of running,
    launchers take their GPU (not interpreter) branches, and fp32 matmul precision can be changed."""
    import torch
    from triton.runtime.jit import KernelInterface

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # pragma: no cover
        Autotuner = ()

    def getitem(self, grid):
        def launch(*args, **kwargs):
            if isinstance(self, Autotuner):
                for cfg in self.configs:
                    opts = {k: getattr(cfg, k, None) for k in OPTION_NAMES}
                    launches.append(_make_launch(self.fn, args, {**kwargs, **cfg.kwargs}, opts))
            else:
                launches.append(_make_launch(self, args, kwargs))
        return launch

    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_prec = torch.get_float32_matmul_precision()
    saved_getitem = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    os.environ["TRITON_INTERPRET"] = "0"   # launchers' _interpret() checks: take the GPU configs
    try:
        yield
    finally:
        KernelInterface.__getitem__ = saved_getitem
        torch.set_float32_matmul_precision(saved_prec)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


@contextlib.contextmanager
def _gpu_launch_config(mod):
    """Launchers that decide 'interpreter or GPU' from the tensors' device get told GPU: every
    ``_*config`` function of ``mod`` with an ``interpret`` parameter is called with it False."""
    originals = {}
    for name, fn in vars(mod).items():
        if name.startswith("_") and name.endswith("config") and callable(fn) \
                and "interpret" in inspect.signature(fn).parameters:
            originals[name] = fn
    if not originals:
        raise AttributeError(f"{mod.__name__} has no _*config(..., interpret) function")

    def gpu(orig):
        sig = inspect.signature(orig)

        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.arguments["interpret"] = False
            return orig(*bound.args, **bound.kwargs)
        return call

    for name, fn in originals.items():
        setattr(mod, name, gpu(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(mod, name, fn)


# ------------------------------------------------------------------------------------------------
# Scenarios: the launcher calls (paper shapes x dtypes x flags) whose launches are compiled

def _launcher(mod, name):
    if not hasattr(mod, name):
        raise AttributeError(f"{mod.__name__} has no launcher {name!r}")
    return getattr(mod, name)


_DTYPES = ("float32", "bfloat16", "float16")
DEV = "meta"   # launchers run on meta tensors: shapes, strides and offsets without memory traffic


def _precisions(dtype: str):
    # fp32 follows torch's matmul precision: "highest" (default) = exact fp32 dots, "high" = tf32
    return ("highest", "high") if dtype == "float32" else ("highest",)


def _tag(dtype, prec):
    return _SHORT[dtype] + ("-tf32" if prec == "high" else "")


def _attention_scenarios():
    """(label, fast, call) for class_attention: forward single-split and split+merge, backward with one
    split and with several (deterministic partial dQ and atomic dQ)."""
    import torch

    B, H, L = 2, 8, 4096
    ca = kernel_module("class_attention")
    variants = getattr(ca, "VARIANTS", (None,))   # (default, alternatives...) or no variants at all
    out = []
    for variant in variants:
        for D in ATTN_D:
            for N in ATTN_N:
                for dtype in _DTYPES:
                    for prec in _precisions(dtype):
                        # fast: the paper's main case (ADE20K, d=512 / 8 heads, bf16 training)
                        fast = variant == variants[0] and D == 64 and N == 150 and dtype == "bfloat16"

                        def call(N=N, D=D, dtype=dtype, prec=prec, variant=variant):
                            dt = getattr(torch, dtype)
                            torch.set_float32_matmul_precision(prec)
                            q = torch.empty(B, H, N, D, dtype=dt, device=DEV)
                            k = torch.empty(B, H, L, D, dtype=dt, device=DEV)
                            v = torch.empty_like(k)
                            scale = D ** -0.5
                            with ca.use_variant(variant) if variant else contextlib.nullcontext():
                                for splits in (1, 2):
                                    o, lse = ca.forward(q, k, v, scale, splits=splits)
                                for splits, det in ((1, True), (2, True), (2, False)):
                                    ca.backward(torch.empty_like(o), q, k, v, o, lse, scale, det, splits=splits)

                        vtag = f" {variant}" if variant and len(variants) > 1 else ""
                        out.append((f"attn{vtag} N={N} D={D} {_tag(dtype, prec)}", fast, call))
    return out


def _mask_logits_scenarios():
    import torch

    B, C, h, w = 2, 512, 64, 64
    out = []
    for N in PAPER_N + (1024,):
        for dtype in _DTYPES:
            for prec in _precisions(dtype):
                for grad in (False, True):
                    # fast: every tuner config of the bf16 forward product (ADE20K)
                    fast = N == 150 and dtype == "bfloat16" and not grad

                    def call(N=N, dtype=dtype, prec=prec, grad=grad):
                        ml = kernel_module("mask_logits")
                        dt = getattr(torch, dtype)
                        torch.set_float32_matmul_precision(prec)
                        feats = torch.empty(B, h * w, C, dtype=dt, device=DEV)
                        cls = torch.empty(B, N, C, dtype=dt, device=DEV)
                        logits = torch.empty(B, N, h, w, dtype=dt, device=DEV)
                        if grad:
                            ml.backward(logits, feats, cls)
                        else:
                            ml.forward(feats, cls, h, w)

                    out.append((f"mask_logits {'bwd' if grad else 'fwd'} N={N} {_tag(dtype, prec)}", fast, call))
    return out


def _ensemble_ce_scenarios():
    import torch

    M, B, h, w, H, W = 4, 2, 64, 64, 256, 256   # stride-4 learner grid of a 256x256 crop
    ce = kernel_module("ensemble_ce")
    variants = getattr(ce, "VARIANTS", (None,))
    out = []
    for variant in variants:
        for N in PAPER_N:
            for align in (False, True):
                fast = N == 171 and not align   # the largest class tile

                def call(N=N, align=align, variant=variant):
                    run = _launcher(ce, "upsampled_ce")
                    rows = getattr(ce, "ROW_ALIGN", 1)  # the chain pads class rows to it; callers may not
                    padded = torch.empty(M + 1, B, h, w, -(-N // rows) * rows, device=DEV)[..., :N]
                    target = torch.zeros(B, H, W, dtype=torch.int64, device=DEV)
                    with _gpu_launch_config(ce), ce.use_variant(variant) if variant else contextlib.nullcontext():
                        for z in (padded, torch.empty(M + 1, B, h, w, N, device=DEV)):
                            for need_grad, det in ((False, False), (True, False), (True, True)):
                                run(z, target, 255, align, need_grad, det)

                vtag = f" {variant}" if variant and len(variants) > 1 else ""
                out.append((f"ensemble_ce{vtag} N={N} align={align}", fast, call))
    for N in PAPER_N:
        for dtype in ("float32", "bfloat16"):
            for align in (False, True):
                fast = N == 171 and dtype == "bfloat16" and not align

                def call(N=N, dtype=dtype, align=align):
                    rows = getattr(ce, "ROW_ALIGN", 1)
                    d_sum = torch.empty(B, 128, 128, -(-N // rows) * rows, device=DEV)[..., :N]
                    with _gpu_launch_config(ce):
                        for s in (128, 64):  # the finest learner (no resize) and a coarser one
                            x = torch.empty(B, N, s, s, dtype=getattr(torch, dtype), device=DEV)
                            for grad in (None, d_sum):
                                _launcher(ce, "learner_map")(x, (128, 128), align, rows, grad)

                out.append((f"learner_map N={N} {_SHORT[dtype]} align={align}", fast, call))
    for N in PAPER_N:
        for dtype in ("float32", "bfloat16"):
            fast = N == 171 and dtype == "bfloat16"

            def call(N=N, dtype=dtype):
                rows = getattr(ce, "ROW_ALIGN", 1)
                grid = torch.empty(B, 128, 128, -(-N // rows) * rows, device=DEV)[..., :N]
                with _gpu_launch_config(ce):
                    for s in (64, 16):  # 2x and 8x coarser than the finest learner
                        x = torch.empty(B, N, s, s, dtype=getattr(torch, dtype), device=DEV)
                        for align in (False, True):
                            _launcher(ce, "learner_grads")(x, grid, grid, align)

            out.append((f"learner_grads N={N} {_SHORT[dtype]}", fast, call))
    for N in PAPER_N:
        for dtype in ("float32", "bfloat16"):
            fast = N == 171 and dtype == "bfloat16"

            def call(N=N, dtype=dtype):
                rows = getattr(ce, "ROW_ALIGN", 1)
                xs = [torch.empty(B, N, s, s, dtype=getattr(torch, dtype), device=DEV) for s in (128, 64, 32, 16)]
                grid = torch.empty(B, 128, 128, -(-N // rows) * rows, device=DEV)[..., :N]
                active = torch.empty(B, 128, 128, N, dtype=torch.bool, device=DEV)
                # log_sum_scores launches ensemble_predict's merge kernel with that module's config
                with _gpu_launch_config(ce), _gpu_launch_config(kernel_module("ensemble_predict")):
                    for align in (False, True):
                        _launcher(ce, "log_sum_scores")(xs, align, rows, 1e-15)
                    _launcher(ce, "log_sum_grad")(grid, grid, active)
                    d = torch.empty(B, N, 128, 128, device=DEV)
                    for learn in (d, grid.permute(0, 3, 1, 2)):  # class-major; the padded grid, transposed
                        _launcher(ce, "combine_grads")(d, learn, d.new_empty(()), d.new_empty(()),
                                                       getattr(torch, dtype))

            out.append((f"log_sum_scores, log_sum_grad, combine_grads N={N} {_SHORT[dtype]}", fast, call))
    return out


def _ensemble_predict_scenarios():
    import torch

    B, h, w, size = 2, 128, 128, (512, 512)
    out = []
    for N in PAPER_N:
        for align in (False, True):
            fast = N == 171 and not align

            def call(N=N, align=align):
                ep = kernel_module("ensemble_predict")
                with _gpu_launch_config(ep):
                    _launcher(ep, "upsampled_argmax")(torch.empty(B, h, w, N, device=DEV), size, align)

            out.append((f"ensemble_predict N={N} align={align}", fast, call))
    for N in PAPER_N:
        for dtype in ("float32", "bfloat16"):
            for merge in ("mean", "product", "vote"):
                for align in (False, True):
                    fast = N == 171 and dtype == "bfloat16" and not align

                    def call(N=N, dtype=dtype, merge=merge, align=align):
                        ep = kernel_module("ensemble_predict")
                        xs = [torch.empty(B, N, s, s, dtype=getattr(torch, dtype), device=DEV) for s in (h, 64, 32, 16)]
                        with _gpu_launch_config(ep):
                            for row_align in (1, 16):  # predict's dense rows, the loss's padded ones
                                _launcher(ep, "merge_scores")(xs, merge, align, row_align)

                    out.append((f"merge_scores {merge} N={N} {_SHORT[dtype]} align={align}", fast, call))
    return out


SCENARIOS = (_attention_scenarios, _mask_logits_scenarios, _ensemble_ce_scenarios, _ensemble_predict_scenarios)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str                     # "<module>.<kernel>[<config>]", unique
    launch: Launch
    scenario: str               # the first scenario that launched it
    fast: bool                  # part of the default (non-slow) test subset


def cases(errors: list | None = None) -> list[Case]:
    """Every distinct launch of every scenario, in scenario order (deterministic). With ``errors``
    (a list), a scenario family that fails is recorded there as (family, traceback) and skipped."""
    import traceback

    for op in ("class_attention", "mask_logits", "ensemble_ce", "ensemble_predict"):
        try:  # import (define the kernels) before recording flips TRITON_INTERPRET to "0"
            kernel_module(op)
        except Exception:
            if errors is None:
                raise
            errors.append((op, traceback.format_exc()))
    found: dict[Launch, list] = {}
    for make in SCENARIOS:
        family: dict[Launch, list] = {}
        try:
            for label, fast, call in make():
                launches: list[Launch] = []
                with recording(launches):
                    call()
                if not launches:
                    raise RuntimeError(f"scenario {label!r} launched no kernel")
                for i, ln in enumerate(launches):
                    entry = family.setdefault(ln, [f"{label} launch {i + 1}", False])
                    entry[1] = entry[1] or fast
        except Exception:
            if errors is None:
                raise
            errors.append((make.__name__.strip("_").replace("_scenarios", ""), traceback.format_exc()))
            continue
        for ln, (where, fast) in family.items():
            entry = found.setdefault(ln, [where, False])
            entry[1] = entry[1] or fast
    result, seen = [], set()
    for ln, (where, fast) in found.items():
        cid = f"{ln.kernel}[{ln.config()}]"
        if cid in seen:  # same constexprs and dtypes, other strides / integer specialisation
            cid = f"{ln.kernel}[{ln.config()} @ {where}]"
        seen.add(cid)
        result.append(Case(cid, ln, where, fast))
    return result


# ------------------------------------------------------------------------------------------------
# Compiling (in a process where TRITON_INTERPRET is off, so kernels are JITFunctions)

TARGET = ("cuda", 90, 32)


class Unavailable(RuntimeError):
    """triton, its nvidia backend or its ptxas is missing: the test skips."""


def ptxas_path() -> str:
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError as e:
        raise Unavailable(f"triton's nvidia backend is not importable: {e}")
    try:
        path = nv.get_ptxas(TARGET[1]).path if hasattr(nv, "get_ptxas") else __import__("triton").knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001  (a missing binary raises from inside triton's knobs)
        raise Unavailable(f"triton's ptxas is not available: {e}")
    if not path or not os.path.exists(path):
        raise Unavailable(f"triton's ptxas is not available ({path!r})")
    return path


def _ptxas_flags(options) -> list[str]:
    """The flags triton's nvidia backend gives ptxas (make_cubin), less input/output."""
    from triton.backends.nvidia import compiler as nv

    src = inspect.getsource(nv.CUDABackend.make_cubin)
    flags = ["-lineinfo", "-v"]
    if not getattr(options, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if "regAllocOptLevel=2" in src:          # triton >= 3.7 works around a ptxas 13 bug with it
        flags.append("--regAllocOptLevel=2")
    if getattr(options, "ptx_options", None):
        flags += options.ptx_options.split(" ")
    return flags + [f"--gpu-name={nv.sm_arch_from_capability(TARGET[1])}"]


def _example(enc):
    import torch

    kind = enc[0]
    if kind == "tensor":
        t = torch.empty(64, dtype=getattr(torch, enc[1]))
        return t if enc[2] else t[1:]   # 1 element in: not 16-byte aligned
    if kind == "int":
        return _INT_EXAMPLE[enc[1]]
    if kind == "float":
        return 0.5
    if kind in ("bool", "const"):
        return enc[1]
    raise ValueError(enc)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_launch(ln: Launch) -> dict:
    """Compile one launch for sm_90 and return {registers, spill_stores, spill_loads, stack, seconds}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    t0 = time.perf_counter()
    fn = getattr(importlib.import_module(ln.module), ln.name)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{ln.kernel} is a {type(fn).__name__}, not a JITFunction (TRITON_INTERPRET=1 here?)")
    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    # The JIT's own binding and specialisation (JITFunction.run), minus the driver.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {name: _example(enc) for name, enc in ln.params}
    kwargs.update(dict(ln.options))
    kwargs["debug"] = fn.debug
    from triton import knobs
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, opts = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [ptxas_path(), *_ptxas_flags(options), src, "-o", os.path.join(d, "k.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed ({run.returncode}): {' '.join(cmd)}\n{log}")
    res = {"seconds": round(time.perf_counter() - t0, 2), "log": log}
    for k, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"no {k!r} in the ptxas report:\n{log}")
        res[k] = int(m.group(1))
    return res


def _compile_or_error(ln: Launch) -> dict:
    try:
        return compile_launch(ln)
    except Unavailable:
        raise
    except Exception as e:  # noqa: BLE001  (reported per case, not fatal to the others)
        return {"error": f"{type(e).__name__}: {e}"}


def default_jobs() -> int:
    """Parallel compiles: SM90_COMPILE_JOBS, else half the cores (at most 8)."""
    env = os.environ.get("SM90_COMPILE_JOBS")
    return max(1, int(env)) if env else max(1, min(8, (os.cpu_count() or 2) // 2))


def compile_all(launches: list[Launch], progress=None, jobs: int = 1) -> list[dict]:
    """Results in the order of ``launches``; ``jobs`` > 1 compiles in worker processes."""
    if jobs <= 1 or len(launches) <= 1:
        results = map(_compile_or_error, launches)
        pool = None
    else:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(min(jobs, len(launches)),
                                                      mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_compile_or_error, launches)
    out = []
    try:
        for ln, r in zip(launches, results):
            out.append(r)
            if progress:
                progress(ln, r)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def compile_in_subprocess(launches: list[Launch], timeout: float | None = None, jobs: int = 1) -> list[dict]:
    """compile_all in a fresh interpreter with TRITON_INTERPRET=0 (the caller's kernels may be interpreted).
    Raises Unavailable when triton/ptxas is missing there."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--compile-stdin", "-j", str(jobs)], input=json.dumps([ln.to_json() for ln in launches]),
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
    if proc.returncode == 3:
        raise Unavailable(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "unavailable")
    if proc.returncode != 0:
        raise RuntimeError(f"sm_90 compile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def triton_version() -> str:
    import triton
    return triton.__version__


# ------------------------------------------------------------------------------------------------
# CLI

def _table(rows) -> str:
    head = ("kernel", "config", "regs", "spill st/ld", "s")
    rows = [head] + rows
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="only the default test subset")
    p.add_argument("-k", dest="filter", action="append", default=[],
                   help="only case ids containing this substring (repeat: all of them)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--list", action="store_true", help="list case ids, compile nothing")
    p.add_argument("-j", dest="jobs", type=int, default=1, help="parallel compiles (default 1)")
    p.add_argument("--compile-stdin", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.compile_stdin:
        launches = [Launch.from_json(d) for d in json.loads(sys.stdin.read())]
        try:
            ptxas_path()
            res = compile_all(launches, jobs=a.jobs)
        except Unavailable as e:
            print(str(e))
            return 3
        print(json.dumps(res))
        return 0

    errors: list = []
    sel = [c for c in cases(errors) if (c.fast or not a.fast) and all(f in c.id for f in a.filter)]
    for family, tb in errors:
        print(f"warning: the {family} launchers could not be recorded (left out):\n{tb}", file=sys.stderr)
    if a.list:
        print("\n".join(f"{'fast' if c.fast else 'slow'}  {c.id}" for c in sel))
        return 0
    try:
        ptxas_path()
    except Unavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 3
    print(f"triton {triton_version()}, target sm_90, {len(sel)} cases", file=sys.stderr)

    def progress(ln, r):
        if not a.json:
            status = r.get("error") or f"{r['registers']} regs, spills {r['spill_stores']}/{r['spill_loads']}"
            print(f"  {ln.kernel}[{ln.config()}]: {status}", file=sys.stderr)

    res = compile_all([c.launch for c in sel], progress, jobs=a.jobs)
    if a.json:
        print(json.dumps([{"id": c.id, "kernel": c.launch.kernel, "config": c.launch.config(), "scenario": c.scenario,
                           **{k: v for k, v in r.items() if k != "log"}} for c, r in zip(sel, res)], indent=1))
    else:
        rows = [(c.launch.kernel, c.id[len(c.launch.kernel) + 1:-1], r.get("registers", "ERR"),
                 f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else r.get("error", "")[:60],
                 r.get("seconds", "")) for c, r in zip(sel, res)]
        print(_table(rows))
    bad = [c.id for c, r in zip(sel, res) if "error" in r or r["spill_stores"] or r["spill_loads"]]
    return 1 if bad or errors else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")   # before triton is imported: kernels are JITFunctions
    sys.exit(main())
