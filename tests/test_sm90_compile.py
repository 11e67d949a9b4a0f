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
    # Every default design compiles clean with triton 3.8 and 3.6 (the full grid on each). The legacy
    # attention design (kept only until a GPU run compares it with "tiled", then deleted) does not:
    # its backward at D=128 (64 x 16 tiles, 12-324 bytes) and at D=32 with 64-key steps (4-48), its
    # exact-fp32 single-split forward at D=128 (12, triton 3.8).
    (r"^class_attention\._bwd_kernel\[fp32\*9 BLOCK_N=64 BLOCK_L=16 BLOCK_D=128 ", "legacy backward at D=128"),
    (r"^class_attention\._bwd_kernel\[fp32\*9 BLOCK_N=32 BLOCK_L=64 BLOCK_D=32 ACCUM_KV=False .*warps=4 ",
     "legacy backward at D=32"),
    (r"^class_attention\._fwd_split_kernel\[fp32\*8 BLOCK_N=32 BLOCK_L=32 BLOCK_D=128 SINGLE=True DOT_PREC=ieee ",
     "legacy exact-fp32 forward at D=128"),
    # (triton 3.6, the GPU machine's: also its 256 x 16 backward at D=32 with fp32 scratch, 4 bytes)
    (r"^class_attention\._bwd_kernel\[fp32\*9 BLOCK_N=256 BLOCK_L=16 BLOCK_D=32 ACCUM_KV=True ",
     "legacy backward at D=32, 256 rows"),
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
