"""Training curves (curves.png) and the TensorBoard on/off note."""
import csv
import importlib.util
import sys
import types

import numpy as np
import pytest
from PIL import Image

from senformer.cli import train_main
from senformer.engine.curves import plot_scalars, read_scalars
from senformer.engine.scalars import ScalarWriter

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tag", "value"])
        w.writerows(rows)


@needs_mpl
def test_plot_scalars_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, 41):
        for tag, scale in (("loss", 3), ("loss_ensemble", 1), ("loss_learners", 1.5), ("loss_aux", 0.5)):
            rows.append([step, f"train/{tag}", f"{scale * np.exp(-step / 8) + rng.uniform(0, 0.05):.6g}"])
        rows += [[step, "train/lr", "0.001"], [step, "train/img_per_s", "12.5"]]
        if step % 20 == 0:
            rows.append([step, "val/mIoU", f"{rng.uniform(0.1, 0.6):.6g}"])
    rows.append(["41", "train/loss", "nan"])  # skipped, as a half-written row would be
    csv_path = tmp_path / "scalars.csv"
    _write_csv(csv_path, rows)
    series = read_scalars(csv_path)
    assert series["val/mIoU"][0] == [20, 40] and len(series["train/loss"][0]) == 40

    png = tmp_path / "curves.png"
    assert plot_scalars(csv_path, png) == png
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 100
        assert np.asarray(im.convert("L")).std() > 0  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "scalars.csv"]  # no temp file left


@needs_mpl
def test_plot_scalars_without_rows_or_val_points(tmp_path):
    csv_path, png = tmp_path / "scalars.csv", tmp_path / "curves.png"
    _write_csv(csv_path, [])
    assert plot_scalars(csv_path, png) is None and not png.exists()
    _write_csv(csv_path, [[1, "train/loss", "2.5"]])  # one point, no validation yet
    assert plot_scalars(csv_path, png) == png and png.stat().st_size > 0


@needs_mpl
def test_missing_matplotlib_is_a_clear_import_error(tmp_path, monkeypatch):
    csv_path = tmp_path / "scalars.csv"
    _write_csv(csv_path, [[1, "train/loss", "2.5"]])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_scalars(csv_path, tmp_path / "curves.png")


def test_tensorboard_note(tmp_path, monkeypatch):
    # whether or not tensorboard is installed here: make the import fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    notes = []
    ScalarWriter(tmp_path, True, note=notes.append).close()
    assert notes == [f"TensorBoard logging off: tensorboard is not installed (pip install tensorboard); "
                     f"scalars go to {tmp_path / 'scalars.csv'}"]

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    notes.clear()
    ScalarWriter(tmp_path, True, note=notes.append)
    assert notes == [f"TensorBoard: tensorboard --logdir {tmp_path / 'tb'}"]
    ScalarWriter(tmp_path, False, note=notes.append)  # other ranks: no writer, no note
    assert len(notes) == 1


@needs_mpl
def test_training_run_leaves_curves_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    wd = tmp_path / "run"
    assert train_main(["--model", "toy", "--iters", "3", "--work-dir", str(wd), "--num-workers", "0", "--no-progress",
                       "--set", "log.interval=1", "--set", "data.val_options.length=1",
                       "--set", "data.crop_size=[32,32]", "--device", "cpu"]) == 0
    with Image.open(wd / "curves.png") as im:
        assert im.format == "PNG" and im.width > 0
    out = capsys.readouterr().out
    assert out.count("TensorBoard logging off") == 1 and "curves.png not written" not in out
    log = (wd / "train.log").read_text()
    assert log.count("TensorBoard logging off") == 1 and "training curves:" in log


def _failing_run(tmp_path, monkeypatch):
    """A run whose third step raises: the error must come out unchanged after curves.png is tried."""
    from senformer.engine.trainer import Trainer
    step = Trainer.train_step

    def train_step(self, batch):
        if self.step == 2:
            raise RuntimeError("boom")
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    wd = tmp_path / "run"
    with pytest.raises(RuntimeError, match="^boom$"):
        train_main(["--model", "toy", "--iters", "4", "--work-dir", str(wd), "--num-workers", "0", "--no-progress",
                    "--set", "log.interval=1", "--set", "data.val_options.length=1",
                    "--set", "data.crop_size=[32,32]", "--device", "cpu"])
    return wd


@needs_mpl
def test_failed_run_still_plots(tmp_path, monkeypatch):
    wd = _failing_run(tmp_path, monkeypatch)
    assert (wd / "curves.png").stat().st_size > 0


def test_curves_failure_is_a_warning_that_never_hides_the_error(tmp_path, monkeypatch, capsys):
    import senformer.engine.curves as curves

    def broken(*_):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(curves, "plot_scalars", broken)
    wd = _failing_run(tmp_path, monkeypatch)
    line = "warning: curves.png not written: OSError: disk full"
    assert line + "\n" in capsys.readouterr().out and line + "\n" in (wd / "train.log").read_text()
    assert not (wd / "curves.png").exists()
