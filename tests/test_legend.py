"""predict_files' class key (legend.png, classes.json) and its progress options."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from senformer.data.classes import default_palette
from senformer.engine.legend import class_table, draw_legend, legend_layout, load_font
from senformer.engine.predict import predict_files
from senformer.engine.toy import ToySegmentor

K = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(40, 52), (33, 47), (48, 36)]):
        files.append(d / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(files[-1])
    return files


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ToySegmentor(K)
    with torch.no_grad():  # classes 1 and 4 never win, so "present" is a strict subset of "all"
        for learner in m.head.learners:
            learner.proj.weight[0] = 0
            learner.proj.bias[0] = 1  # feature 0 is 1 everywhere ...
            learner.cls_emb[[1, 4]] = 0
            learner.cls_emb[[1, 4], 0] = -100.0  # ... so these two classes score -100
    return m


def _predict(model, files, out, **kw):
    return predict_files(model, files, out, default_palette(K), scale=(64, 64), **kw)


def _swatch_colors(png, rows):
    arr = np.asarray(Image.open(png).convert("RGB"))
    # the middle of each swatch (its outer ring is a grey border)
    return [tuple(int(v) for v in arr[(r.swatch[1] + r.swatch[3]) // 2, (r.swatch[0] + r.swatch[2]) // 2])
            for r in rows]


def test_classes_json_counts_match_the_label_pngs_and_legend_shows_present_classes(model, images, tmp_path):
    out = tmp_path / "out"
    names = ["road", "car", "sky", "tree", "person", "sign"]
    assert _predict(model, images, out, classes=names) == ["img0", "img1", "img2"]
    labels = np.concatenate([np.asarray(Image.open(out / "label" / f"{f.stem}.png")).ravel() for f in images])
    table = json.loads((out / "classes.json").read_text())
    assert [r["id"] for r in table] == list(range(K)) and [r["name"] for r in table] == names
    assert [r["color"] for r in table] == default_palette(K).tolist()
    assert [r["pixels"] for r in table] == np.bincount(labels, minlength=K).tolist()
    present = [r for r in table if r["pixels"]]
    assert 1 < len(present) < K and not {1, 4} & {r["id"] for r in present}

    _, rows = legend_layout(present)
    assert [r.id for r in rows] == [r["id"] for r in present]  # id order
    assert Image.open(out / "legend.png").size == legend_layout(present)[0]
    assert _swatch_colors(out / "legend.png", rows) == [tuple(r["color"]) for r in present]


def test_legend_all_none_and_default_names(model, images, tmp_path):
    _predict(model, images[:1], tmp_path / "all", legend="all", outputs=("label",))
    table = json.loads((tmp_path / "all" / "classes.json").read_text())
    assert [r["name"] for r in table] == [f"class{i}" for i in range(K)]
    _, rows = legend_layout(table)
    assert [r.id for r in rows] == list(range(K))
    assert _swatch_colors(tmp_path / "all" / "legend.png", rows) == [tuple(c) for c in default_palette(K).tolist()]

    _predict(model, images[:1], tmp_path / "none", legend="none", outputs=("label",))
    assert (tmp_path / "none" / "classes.json").is_file() and not (tmp_path / "none" / "legend.png").exists()
    with pytest.raises(ValueError, match="legend must be one of"):
        _predict(model, images[:1], tmp_path / "bad", legend="some")


def test_many_classes_go_in_columns():
    table = class_table(np.ones(150, int), [f"name {i}" for i in range(150)], default_palette(150))
    font = load_font()
    (w, h), rows = legend_layout(table, font)
    xs = sorted({r.swatch[0] for r in rows})
    assert len(xs) == 5 and len(rows) == 150
    assert h < 1000 and w < 2000
    boxes = [r.swatch for r in rows]
    assert all(b[2] < w and b[3] < h for b in boxes) and len(set(boxes)) == 150
    assert draw_legend(table, font).size == (w, h)


def test_progress_bar_and_callable(model, images, tmp_path, capsys):
    _predict(model, images[:2], tmp_path / "bar", progress=True, outputs=("label",))
    err = capsys.readouterr().err
    assert "predict" in err and "2/2" in err
    _predict(model, images[:2], tmp_path / "quiet", progress=False, outputs=("label",))
    assert capsys.readouterr().err == ""
    seen = []
    _predict(model, images, tmp_path / "cb", progress=seen.append, outputs=("label",))
    assert seen == images and capsys.readouterr().err == ""
