"""Every shipped Triton kernel config compiles for sm_90 (Hopper: H100/H200) without register spills.

No GPU needed: ``sm90_compile`` calls each launcher of ``senformer.kernels`` on CPU tensors of paper
shapes with its launches intercepted (so the configs are those the launchers' own config functions and
autotuners pick on a GPU), compiles each distinct launch with ``triton.compile`` for sm_90 in a
subprocess (kernels must be JITFunctions there, not interpreted), and reads triton's ptxas ``-v``
report. One test per distinct launch; the paper's main case runs by default (~1 min cold, seconds
with a warm triton cache), everything else is ``slow`` (``--run-slow``; ``SM90_COMPILE_JOBS`` sets
the parallel compiles). For a table to tune with: ``python tests/sm90_compile.py [--fast] [-k ...]``.
"""
import re

import pytest

pytest.importorskip("triton")

import sm90_compile as sm90  # noqa: E402  (tests/ is on sys.path, as for support.py)

# Shipped configs that spill today: (regex searched in the case id, reason). They stay visible as
# xfail; fix the kernel's config function and delete the entry (an XPASS says it is fixed).
KNOWN_SPILLS = [
    # triton 3.8 / ptxas 12.9: the forward product (channels-first output) with exact-fp32 dots
    # (DOT_PREC=ieee, FMA units) on the 64x256x32 8-warp tuner config: 255 registers, 4 B spilled.
    # The autotuner can still pick it (it benchmarks every config), so it is a shipped config.
    (r"^mask_logits\._bmm_kernel\[fp32\*3 BLOCK_M=64 BLOCK_N=256 BLOCK_K=32 DOT_PREC=ieee DOT_F32=False "
     r"warps=8 stages=3(\]| @ mask_logits fwd)", "exact-fp32 64x256x32 tile, 4 bytes (mask_logits._gpu_configs)"),
    # Same exact-fp32 path, the 64x64x64 4-warp tuner config: 4 bytes (first full slow-grid run).
    (r"^mask_logits\._bmm_kernel\[fp32\*3 BLOCK_M=64 BLOCK_N=64 BLOCK_K=64 DOT_PREC=ieee .*warps=4 ",
     "exact-fp32 64x64x64 tile, 4 bytes (mask_logits._gpu_configs)"),
    # Tiled attention, exact-fp32 dots (DOT_PREC=ieee) at D=32/64 on 8 warps: 8-12 bytes spilled at only
    # 80 registers; neither one stage nor 4 warps (40-90 bytes) removes it, so it is not plain register
    # pressure. Unexplained: investigate, then delete this entry.
    (r"^class_attention\._tiled_bwd_kernel\[fp32\*9 TILE0=(64|32) TILE1=0 .* BLOCK_D=(32|64) ACCUM_KV=True "
     r"DOT_PREC=ieee .*warps=8 ", "tiled attention exact-fp32 backward D<=64, 8-12 bytes at 80 registers"),
    (r"^class_attention\._tiled_fwd_kernel\[fp32\*8 TILE0=64 TILE1=0 .* BLOCK_D=64 SINGLE=False DOT_PREC=ieee "
     r".*warps=8 ", "tiled attention exact-fp32 forward D=64, 8 bytes at 80 registers"),
    # The legacy attention design (kept only until a GPU run compares it with "tiled", then deleted):
    # its backward at D=128 (64 x 16 tiles, 32-324 bytes) and at D=32 with 64-key steps (24-48), its
    # forward with a 512-row query block (4), its exact-fp32 forward at D=64 / D=128 (8-12).
    (r"^class_attention\._bwd_kernel\[fp32\*9 BLOCK_N=64 BLOCK_L=16 BLOCK_D=128 ", "legacy backward at D=128"),
    (r"^class_attention\._bwd_kernel\[fp32\*9 BLOCK_N=32 BLOCK_L=64 BLOCK_D=32 ACCUM_KV=False .*warps=4 ",
     "legacy backward at D=32"),
    (r"^class_attention\._fwd_split_kernel\[fp32\*8 BLOCK_N=512 BLOCK_L=32 BLOCK_D=32 SINGLE=False ",
     "legacy forward, 512-row block"),
    (r"^class_attention\._fwd_split_kernel\[fp32\*8 BLOCK_N=64 BLOCK_L=32 BLOCK_D=64 SINGLE=False DOT_PREC=ieee ",
     "legacy exact-fp32 forward at D=64"),
    (r"^class_attention\._fwd_split_kernel\[fp32\*8 BLOCK_N=32 BLOCK_L=32 BLOCK_D=128 SINGLE=True DOT_PREC=ieee ",
     "legacy exact-fp32 forward at D=128"),
]

# A launcher that cannot be recorded (say, mid-rewrite) fails test_enumeration; the others still run.
ENUMERATION_ERRORS = []
CASES = sm90.cases(ENUMERATION_ERRORS)


def _param(case):
    marks = [] if case.fast else [pytest.mark.slow]
    for pattern, reason in KNOWN_SPILLS:
        if re.search(pattern, case.id):
            marks.append(pytest.mark.xfail(reason=f"known sm_90 spill: {reason}", strict=False))
            break
    return pytest.param(case, id=case.id, marks=marks)


def test_enumeration():
    """Every kernel module's launchers ran under the recorder and the default subset covers each module."""
    assert not ENUMERATION_ERRORS, "recording the launchers' kernel launches failed:\n" + "\n".join(
        f"[{family}]\n{tb}" for family, tb in ENUMERATION_ERRORS)
    modules = {c.launch.kernel.split(".")[0] for c in CASES}
    assert modules == {"class_attention", "mask_logits", "ensemble_ce", "ensemble_predict"}
    assert {c.launch.kernel.split(".")[0] for c in CASES if c.fast} == modules
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def sm90_results(request):
    """{case id: ptxas report} for every case selected (and not skipped) in this session, compiled
    in one subprocess on first use."""
    wanted = []
    for item in request.session.items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        if isinstance(case, sm90.Case) and item.get_closest_marker("skip") is None:
            wanted.append(case)
    try:
        reports = sm90.compile_in_subprocess([c.launch for c in wanted], jobs=sm90.default_jobs())
    except sm90.Unavailable as e:
        pytest.skip(f"no offline sm_90 compile here: {e}")
    return {c.id: r for c, r in zip(wanted, reports)}


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_compiles_for_sm90_without_spills(case, sm90_results, record_property):
    r = sm90_results[case.id]
    where = f"{case.launch.kernel} [{case.launch.config()}] (launched by: {case.scenario})"
    if "error" in r:
        pytest.fail(f"{where}: sm_90 compile failed: {r['error']}")
    record_property("registers", r["registers"])
    record_property("spill_bytes", r["spill_stores"] + r["spill_loads"])
    report = (f"{where}: {r['registers']} registers, {r['spill_stores']} bytes spill stores, "
              f"{r['spill_loads']} bytes spill loads")
    print(report)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, report
