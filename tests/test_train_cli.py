"""senformer-train as a user runs it: resume from the command line, signals, one-line user errors."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from senformer import cli
from senformer.engine.checkpoint import latest_checkpoint, load_state

# senformer_tiny with stochastic depth, so that a resume that does not restore the RNG state exactly
# (e.g. before the DataLoader iterator draws its base seed) gives different losses
RUN = ["--iters", "6", "--batch-size", "2", "--crop-size", "32", "--num-workers", "1", "--checkpoint-interval", "2",
       "--device", "cpu", "--no-progress", "--set", "log.interval=1", "--set", "data.val_options.length=2",
       "--set", "model.kwargs.drop_path_rate=0.2", "--set", "schedule.warmup_iters=2"]


def _scalars(work_dir):
    with open(Path(work_dir) / "scalars.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["tag"] != "train/img_per_s"]
    keys = [(r["step"], r["tag"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (step, tag) was written twice"
    return {k: r["value"] for k, r in zip(keys, rows)}


def _metrics(work_dir):
    import json
    return json.loads((Path(work_dir) / "metrics.json").read_text())


def test_resume_from_the_cli_restores_the_run_bit_for_bit(tmp_path, capsys):
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert cli.train_main(RUN + ["--work-dir", str(straight)]) == 0
    assert cli.train_main(RUN + ["--work-dir", str(parts), "--stop-after", "3"]) == 0
    assert not (parts / "metrics.json").exists()
    # resuming from step 2 re-does step 3: its scalars must be replaced, not repeated
    os.remove(parts / "checkpoints" / "latest")
    import shutil
    shutil.rmtree(parts / "checkpoints" / "iter_0000003")
    assert cli.train_main(["--resume", str(parts / "checkpoints" / "iter_0000002"), "--stop-after", "4",
                           "--no-progress"]) == 0
    # no flag repeated: the saved config (6 iterations, not the default 300) is the run's
    assert cli.train_main(["--resume", "--work-dir", str(parts), "--no-progress"]) == 0
    a, b = _scalars(straight), _scalars(parts)
    assert len(a) > 6 * 3 and a == b
    assert _metrics(straight)["mIoU"] == _metrics(parts)["mIoU"]
    log = (parts / "train.log").read_text()
    assert "training shapes_tiny: 6 iterations" in log and "300 iterations" not in log


def test_resume_refuses_flags_that_change_the_run(tmp_path, capsys):
    wd = tmp_path / "run"
    assert cli.train_main(RUN + ["--work-dir", str(wd), "--stop-after", "2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--resume", "--work-dir", str(wd), "--lr", "0.5", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "optim.lr: 0.001 -> 0.5" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--resume", "--work-dir", str(wd), "--set", "model.kwargs.drop_path_rate=0.1"])
    assert e.value.code == 2 and "model.kwargs.drop_path_rate" in capsys.readouterr().err
    # allowed: a longer schedule, applied and logged
    assert cli.train_main(["--resume", "--work-dir", str(wd), "--iters", "3", "--no-progress"]) == 0
    assert "resume changes schedule.iters: 6 -> 3" in (wd / "train.log").read_text()
    assert load_state(latest_checkpoint(wd / "checkpoints"))["step"] == 3


@pytest.mark.parametrize("argv, named", [
    (["--set", "optim.lr=abc"], "optim.lr must be a finite number, got 'abc'"),
    (["--set", "data.batch_size=eight"], "data.batch_size must be an integer, got 'eight'"),
    (["--set", "eval.mode=sliding"], "eval.mode must be one of whole, slide"),
    (["--set", "data.crop_size=[0,4]"], "data.crop_size[0] must be >= 1"),
    (["--iters", "0"], "argument --iters: expected an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["--lr", "-1"], "argument --lr: expected a positive number"),
    (["--num-workers", "two"], "argument --num-workers: expected an integer, got 'two'"),
])
def test_bad_values_are_one_line_naming_the_key(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_main(argv + ["--work-dir", str(tmp_path / "run"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and named in lines[-1] and "Traceback" not in lines
    if argv[0] == "--set":  # argparse's own errors come after its usage line
        assert len(lines) == 1
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint_on_resume_names_the_file(tmp_path, capsys):
    wd = tmp_path / "run"
    assert cli.train_main(RUN + ["--work-dir", str(wd), "--stop-after", "2", "--iters", "4"]) == 0
    for name in ("state.pt", "model.safetensors"):
        f = wd / "checkpoints" / "iter_0000002" / name
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.train_main(["--resume", "--work-dir", str(wd), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and str(f) in err and len(err.splitlines()) == 1
        f.write_bytes(data)
    with pytest.raises(ValueError, match="truncated or corrupt"):  # --debug: the exception itself
        f.write_bytes(data[:10])
        cli.train_main(["--resume", "--work-dir", str(wd), "--no-progress", "--debug"])


def _folder_dataset(root, bad_mask=None):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(3):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            shape = (21, 24) if (split, i) == bad_mask else (20, 24)
            Image.fromarray(rng.integers(0, 2, shape).astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    (root / "classes.txt").write_text("a\nb\n")


def test_bad_dataset_file_is_named_before_anything_is_created(tmp_path, capsys):
    root = tmp_path / "data"
    _folder_dataset(root, bad_mask=("val", 2))
    wd = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--dataset", "folder", "--data-root", str(root), "--model", "toy", "--iters", "2",
                        "--work-dir", str(wd), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and str(root / "masks" / "val" / "2.png") in err and "(21, 24)" in err
    assert len(err.splitlines()) == 1 and not wd.exists()
    with pytest.raises(SystemExit) as e:
        cli.train_main(["ade20k_r50", "--data-root", str(tmp_path / "nowhere"), "--work-dir", str(wd)])
    assert e.value.code == 2 and not wd.exists()


def test_bad_label_outside_the_sample_is_one_line_mid_training_or_found_by_check_data(tmp_path, capsys):
    from senformer.data.folders import sample_indices
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    stems = sorted(str(i) for i in range(40))
    hidden = next(stem for k, stem in enumerate(stems) if k not in sample_indices(40))
    for split, n in (("train", 40), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            # not among the 32 label maps a default check decodes
            label = np.full((8, 9), 7) if (split, str(i)) == ("train", hidden) else rng.integers(0, 2, (8, 9))
            Image.fromarray(label.astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    (root / "classes.txt").write_text("a\nb\n")
    bad = root / "masks" / "train" / f"{hidden}.png"
    argv = ["--dataset", "folder", "--data-root", str(root), "--model", "toy", "--iters", "20", "--batch-size", "2",
            "--crop-size", "8", "--num-workers", "1", "--no-progress", "--device", "cpu", "--set", "data.scale=[9,8]"]
    expected = f"label map {bad} holds class 7, but folder has 2 classes (ids 0..1, 255 = ignore)"
    # found mid-training by a worker (one epoch of 20 steps x 2 images loads every file); in a child process,
    # so that a worker left behind would show as a hang at exit (timeout) rather than pass unseen
    proc = subprocess.run([sys.executable, "-m", "senformer.cli", "train", *argv, "--work-dir", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.endswith(expected), err
    assert (tmp_path / "a" / "scalars.csv").exists()
    with pytest.raises(SystemExit) as e:
        cli.train_main(argv + ["--check-data", "--work-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.endswith(expected), err
    assert not (tmp_path / "b").exists()  # --check-data: found before anything is created


def _start(work_dir, *extra):
    cmd = [sys.executable, "-m", "senformer.cli", "train", "--iters", "100000", "--batch-size", "2", "--crop-size",
           "32", "--num-workers", "1", "--checkpoint-interval", "0", "--device", "cpu", "--no-progress",
           "--set", "log.interval=1", "--work-dir", str(work_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a new session: Ctrl-C in a terminal signals the whole foreground group, workers included
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_step(proc, work_dir, step, timeout=120):
    scalars = Path(work_dir) / "scalars.csv"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        if scalars.is_file() and f"\n{step},train/loss," in scalars.read_text():
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("sig, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_signal_finishes_the_step_and_writes_a_checkpoint(sig, to_group, tmp_path):
    wd = tmp_path / "run"
    proc = _start(wd)
    _wait_for_step(proc, wd, 2)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    step = load_state(latest_checkpoint(wd / "checkpoints"))["step"]
    assert step >= 2 and lines[0] == (
        f"interrupted by {signal.Signals(sig).name} at step {step}, checkpoint written to "
        f"{wd / 'checkpoints' / f'iter_{step:07d}'}; resume with senformer-train --resume --work-dir {wd}")


def test_second_signal_exits_at_once_and_latest_stays_complete(tmp_path):
    wd = tmp_path / "run"
    proc = _start(wd, "--checkpoint-interval", "1")
    _wait_for_step(proc, wd, 3)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    ckpt = latest_checkpoint(wd / "checkpoints")
    assert load_state(ckpt)["step"] >= 3  # complete: the state and weights read back
    from safetensors.torch import load_file
    assert load_file(str(ckpt / "model.safetensors"))


def _alive(pid):
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path):
    wd = tmp_path / "run"
    # the default run's loading: with its prefetch queues full, torch's own watchdog takes ~5 s
    proc = _start(wd, "--batch-size", "8", "--crop-size", "64", "--num-workers", "2")
    _wait_for_step(proc, wd, 3)
    children = [int(p) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                for p in (t / "children").read_text().split()]
    assert children, "no DataLoader worker found"
    proc.kill()
    proc.wait()  # not communicate(): the workers hold the output pipes open until they exit
    deadline = time.time() + 2
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(c) for c in children)
