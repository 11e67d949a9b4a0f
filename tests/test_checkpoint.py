import os
import random
import re
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from senformer.engine.checkpoint import (STATE, WEIGHTS, latest_checkpoint, list_checkpoints, load_state,
                                         load_weights, read_weights, rng_state, save_checkpoint, set_rng_state)
from senformer.engine.toy import ToySegmentor
from senformer.errors import CheckpointError


def _state(step):
    return {"step": step, "rng": [rng_state()], "config": "{}"}


def test_round_trip_and_keep_last(tmp_path):
    torch.manual_seed(0)
    m = ToySegmentor(3)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, m, _state(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_0000030", "iter_0000040"]
    assert latest_checkpoint(tmp_path).name == "iter_0000040"
    m2 = ToySegmentor(3)
    load_weights(m2, latest_checkpoint(tmp_path))
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert load_state(latest_checkpoint(tmp_path))["step"] == 40


def test_rng_state_restores_every_generator():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    st = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_mismatched_model_names_the_keys(tmp_path):
    save_checkpoint(tmp_path, 1, ToySegmentor(3), _state(1))
    with pytest.raises(ValueError, match=r"(?s)shape differs: .*cls_emb.*checkpoint \(3, 8\)"):
        load_weights(ToySegmentor(5), latest_checkpoint(tmp_path))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: head\.learners\.2"):
        load_weights(ToySegmentor(3, num_learners=3), latest_checkpoint(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(ToySegmentor(3), tmp_path / "nope")


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path):
    # a child saves step 1, then dies (os._exit: no cleanup, like SIGKILL) halfway through saving step 2
    script = textwrap.dedent(f"""
        import os, torch
        import senformer.engine.checkpoint as ck
        from senformer.engine.toy import ToySegmentor
        m = ToySegmentor(3)
        ck.save_checkpoint({str(tmp_path)!r}, 1, m, {{"step": 1}})
        def dying_save(obj, f, *a, **k):
            open(f, "wb").write(b"partial")
            os._exit(9)
        ck.torch.save = dying_save
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        ck.save_checkpoint({str(tmp_path)!r}, 2, m, {{"step": 2}})
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "iter_0000001" and [p.name for p in list_checkpoints(tmp_path)] == ["iter_0000001"]
    assert load_state(ck)["step"] == 1
    load_weights(ToySegmentor(3), ck)  # complete and loadable
    # the next successful save sweeps the dead process's temporary folder away
    save_checkpoint(tmp_path, 3, ToySegmentor(3), {"step": 3})
    assert not list(tmp_path.glob(".tmp-*"))


def _damage(f, how):
    data = f.read_bytes()
    f.write_bytes({"half": data[:len(data) // 2], "empty": b"", "ten_bytes": data[:10],
                   "garbage": random.Random(0).randbytes(len(data))}[how])


@pytest.mark.parametrize("how", ["half", "empty", "ten_bytes", "garbage"])
@pytest.mark.parametrize("name", [WEIGHTS, STATE])
def test_damaged_checkpoint_file_is_named_with_the_others(tmp_path, name, how):
    d = tmp_path / "checkpoints"
    for step in (10, 20):
        ck = save_checkpoint(d, step, ToySegmentor(3), _state(step))
    _damage(ck / name, how)
    with pytest.raises(CheckpointError) as ei:
        load_weights(ToySegmentor(3), ck) if name == WEIGHTS else load_state(ck)
    msg = str(ei.value)
    assert f"checkpoint file {ck / name} " in msg and "truncated or corrupt" in msg and "\n" not in msg
    assert f"other checkpoints: iter_0000010; resume from one with --resume {d / 'iter_0000010'}" in msg
    assert ei.value.__cause__ is not None


def test_damaged_lone_checkpoint_and_pth_are_named(tmp_path):
    ck = save_checkpoint(tmp_path / "checkpoints", 1, ToySegmentor(3), _state(1))
    _damage(ck / STATE, "half")
    with pytest.raises(CheckpointError, match=r"state\.pt \(\d+ bytes\) is unreadable") as ei:
        load_state(ck)
    assert "other checkpoints" not in str(ei.value)
    pth = tmp_path / "weights.pth"
    for how in ("half", "garbage"):
        torch.save(ToySegmentor(3).state_dict(), pth)
        _damage(pth, how)
        with pytest.raises(CheckpointError, match=f"checkpoint file {re.escape(str(pth))} .*truncated or corrupt"):
            read_weights(pth)


def test_damaged_latest_pointer_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, ToySegmentor(3), _state(1))
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert latest_checkpoint(tmp_path).name == "iter_0000001"


def test_checkpoint_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)  # neither 0600 (safetensors' own) nor the usual 0644
    try:
        ck = save_checkpoint(tmp_path, 1, ToySegmentor(3), _state(1))
    finally:
        os.umask(old)
    assert {stat.S_IMODE((ck / n).stat().st_mode) for n in (WEIGHTS, STATE)} == {0o666 & ~0o027}
