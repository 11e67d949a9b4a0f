import numpy as np
import pytest
from PIL import Image

from senformer.cli import predict_main, train_main
from senformer.data import ShapesDataset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    train_main(["--model", "toy", "--iters", "2", "--work-dir", str(wd), "--num-workers", "0", "--no-progress",
                "--set", "data.val_options.length=1", "--set", "data.crop_size=[32,32]", "--device", "cpu"])
    return wd


def test_predict_folder_and_file(run_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    sizes = {"a": (37, 51), "b": (64, 29)}
    for name, (h, w) in sizes.items():
        img, _ = ShapesDataset("test", length=1, size=(h, w)).load(0)
        Image.fromarray(img).save(inp / ("sub" if name == "b" else "") / f"{name}.jpg")
    extra = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)).save(extra)
    out = tmp_path / "out"
    assert predict_main([str(inp), str(extra), "-c", str(run_dir), "-o", str(out), "--flip", "--learners", "1"]) == 0
    assert "wrote 3 prediction(s)" in capsys.readouterr().out
    sizes["c"] = (20, 30)
    for name, (h, w) in sizes.items():
        lab = Image.open(out / "label" / f"{name}.png")
        col = Image.open(out / "color" / f"{name}.png")
        ov = Image.open(out / "overlay" / f"{name}.png")
        assert lab.size == col.size == ov.size == (w, h)
        assert lab.mode == "L" and col.mode == "P" and ov.mode == "RGB"
        assert np.asarray(lab).max() < 5
        np.testing.assert_array_equal(np.asarray(col), np.asarray(lab))  # palette PNG stores the same ids


def test_predict_errors_name_the_problem(run_dir, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(SystemExit):
        predict_main([str(bad), "-c", str(run_dir), "-o", str(tmp_path / "o")])
    assert "broken.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main([str(tmp_path / "missing.jpg"), "-c", str(run_dir)])
    assert "missing.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main([str(bad), "-c", str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err
