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


def test_checkpoint_first_as_in_eval_and_the_c_option_give_the_same_files(run_dir, tmp_path, capsys):
    img = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (26, 33, 3)).astype(np.uint8)).save(img)
    a, b = tmp_path / "a", tmp_path / "b"
    assert predict_main([str(run_dir), str(img), "-o", str(a), "--no-progress"]) == 0
    assert predict_main([str(img), "-c", str(run_dir), "-o", str(b), "--legend", "all"]) == 0
    out = capsys.readouterr().out
    assert "classes.json, legend.png" in out
    np.testing.assert_array_equal(np.asarray(Image.open(a / "label" / "p.png")),
                                  np.asarray(Image.open(b / "label" / "p.png")))
    assert (a / "legend.png").is_file() and (a / "classes.json").is_file()
    with pytest.raises(SystemExit):
        predict_main([str(run_dir)])  # a checkpoint and no image
    assert "no input images" in capsys.readouterr().err


def test_eval_takes_the_checkpoint_as_an_option_too(run_dir, capsys):
    from senformer.cli import eval_main
    assert eval_main(["-c", str(run_dir), "--limit", "1", "--no-progress"]) == 0
    assert "ensemble: mIoU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_main([str(run_dir), "-c", str(run_dir)])
    assert "two checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([])
    assert "no checkpoint given" in capsys.readouterr().err
