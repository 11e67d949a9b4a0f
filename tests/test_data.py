
import numpy as np
import pytest
from PIL import Image

from senformer.data import ShapesDataset, TestPipeline, TrainPipeline, build_dataset
from senformer.data import folders
from senformer.errors import DataError

RNG = np.random.default_rng(0)


def _img(path, h, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(path)


def _lbl(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return arr


def test_shapes_is_deterministic_and_splits_differ():
    a = ShapesDataset("train", length=5, size=(33, 47), seed=3)
    b = ShapesDataset("train", length=5, size=(33, 47), seed=3)
    img, seg = a.load(4)
    assert img.shape == (33, 47, 3) and img.dtype == np.uint8 and seg.shape == (33, 47)
    assert np.array_equal(img, b.load(4)[0]) and np.array_equal(seg, b.load(4)[1])
    assert not np.array_equal(img, ShapesDataset("val", length=5, size=(33, 47), seed=3).load(4)[0])
    assert not np.array_equal(img, ShapesDataset("train", length=5, size=(33, 47), seed=4).load(4)[0])
    labels = np.unique(np.concatenate([ShapesDataset("val", length=40).load(i)[1].ravel() for i in range(40)]))
    assert labels.tolist() == list(range(5))


def test_shapes_with_pipeline_and_seeded_keys():
    ds = ShapesDataset("train", length=3, size=64, pipeline=TrainPipeline(64, 32))
    x = ds[(1, [0, 7])]
    assert x["img"].shape == (3, 32, 32) and x["name"] == "shapes_train_000001"
    assert (x["img"] == ds[(1, [0, 7])]["img"]).all()
    with pytest.raises(IndexError):
        ds[3]


def test_ade20k_tree_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    lab = RNG.integers(0, 151, (21, 30))
    lab[0, :4] = [0, 1, 150, 255]
    for n in ("ADE_val_00000001", "ADE_val_00000002"):
        _img(root / "images/validation" / f"{n}.jpg", 21, 30)
        _lbl(root / "annotations/validation" / f"{n}.png", lab)
    ds = build_dataset("ade20k", "val", root)
    assert len(ds) == 2 and ds.num_classes == 150
    img, seg = ds.load(0)
    assert img.shape == (21, 30, 3)
    assert seg[0, :4].tolist() == [255, 0, 149, 255]
    np.testing.assert_array_equal(seg[1:], np.where(lab[1:] == 0, 255, lab[1:] - 1))


def test_cityscapes_tree(tmp_path):
    lab = RNG.integers(0, 19, (16, 32))
    lab[0, 0] = 255
    for city, n in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        _img(tmp_path / "leftImg8bit/train" / city / f"{n}_leftImg8bit.png", 16, 32)
        _lbl(tmp_path / "gtFine/train" / city / f"{n}_gtFine_labelTrainIds.png", lab)
        _lbl(tmp_path / "gtFine/train" / city / f"{n}_gtFine_labelIds.png", lab + 7)  # must be ignored
    ds = build_dataset("cityscapes", "train", tmp_path)
    assert ds.names == ["aachen_000000_000019", "bremen_000001_000019"] and ds.num_classes == 19
    np.testing.assert_array_equal(ds.load(1)[1], lab)
    # labelIds saved under the trainIds name: an out-of-range class is an error naming the file
    bad = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    _lbl(bad, lab + 7)
    with pytest.raises(ValueError, match=r"(?s)aachen_000000_000019_gtFine_labelTrainIds.png holds class.*labelTrainIds"):
        ds.load(0)


def test_pascal_context_and_coco_stuff_trees(tmp_path):
    voc = tmp_path / "VOC2010"
    lab = RNG.integers(0, 60, (12, 14))
    for n in ("2008_000002", "2008_000003", "2008_000007"):
        _img(voc / "JPEGImages" / f"{n}.jpg", 12, 14)
        _lbl(voc / "SegmentationClassContext" / f"{n}.png", lab)
    (voc / "ImageSets/SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets/SegmentationContext/val.txt").write_text("2008_000007\n2008_000002\n")
    ds = build_dataset("pascal_context59", "val", voc)
    assert ds.names == ["2008_000007", "2008_000002"] and ds.num_classes == 59
    np.testing.assert_array_equal(ds.load(0)[1], np.where(lab == 0, 255, lab - 1))

    coco = tmp_path / "coco_stuff10k"
    lab = RNG.integers(0, 171, (10, 9))
    _img(coco / "images/test2014/COCO_train2014_000000000077.jpg", 10, 9)
    _lbl(coco / "annotations/test2014/COCO_train2014_000000000077_labelTrainIds.png", lab)
    ds = build_dataset("coco_stuff10k", "val", coco)
    assert len(ds) == 1 and ds.num_classes == 171
    np.testing.assert_array_equal(ds.load(0)[1], lab)


def test_generic_folder_with_class_file_and_test_pipeline(tmp_path):
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    lab = RNG.integers(0, 3, (9, 11))
    _img(tmp_path / "images/val/a.png", 9, 11)
    _lbl(tmp_path / "masks/val/a.png", lab)
    ds = build_dataset("folder", "val", tmp_path, pipeline=TestPipeline(64))
    assert ds.CLASSES == ("sky", "road", "car")
    s = ds[0]
    assert s["img"].shape == (9, 11, 3) and s["seg"].tolist() == lab.tolist()
    flat = tmp_path / "flat"
    _img(flat / "images/b.jpg", 5, 6)
    _lbl(flat / "masks/b.png", np.zeros((5, 6)))
    assert len(build_dataset("folder", "train", flat, classes=["x", "y"])) == 1


def test_wrong_root_lists_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)ADEChallengeData2016/images.*annotations"):
        build_dataset("ade20k", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="gtFine_labelTrainIds"):
        build_dataset("cityscapes", "train", tmp_path)
    with pytest.raises(ValueError, match="needs a data root"):
        build_dataset("ade20k", "train", None)
    with pytest.raises(ValueError, match="unknown dataset 'foo'"):
        build_dataset("foo")


def test_missing_label_and_corrupt_image_are_named(tmp_path):
    root = tmp_path / "ade"
    _img(root / "images/training/x1.jpg", 8, 8)
    (root / "annotations/training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="x1.png"):
        build_dataset("ade20k", "train", root)
    _lbl(root / "annotations/training/x1.png", np.ones((8, 8)))
    bad = root / "images/training/x1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = build_dataset("ade20k", "train", root)
    with pytest.raises(DataError, match=str(bad.name)):
        ds.load(0)
    with pytest.raises(DataError, match=rf"cannot read image file .*{bad.name}"):
        ds.validate()


def _generic(root, n, h=6, w=7, k=3):
    """``n`` random image/mask pairs of a ``k``-class generic folder dataset (labels 1..k-1, never empty)."""
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(k)))
    for i in range(n):
        _img(root / f"images/train/s{i:03d}.png", h, w)
        _lbl(root / f"masks/train/s{i:03d}.png", RNG.integers(1, k, (h, w)))
    return build_dataset("folder", "train", root)


def test_validate_clean_dataset_and_shapes(tmp_path):
    ds = _generic(tmp_path, 40)
    assert ds.validate() == {"pairs": 40, "labels_decoded": 32}
    assert ds.validate(full=True, progress=True) == {"pairs": 40, "labels_decoded": 40}
    assert ShapesDataset("train", length=3).validate() is None


def test_validate_finds_size_mismatch_from_headers_alone(tmp_path, monkeypatch):
    ds = _generic(tmp_path, 5)
    _lbl(tmp_path / "masks/train/s003.png", RNG.integers(1, 3, (6, 8)))

    def no_decoding(path):
        raise AssertionError(f"validate decoded {path} before checking sizes")

    monkeypatch.setattr(folders, "read_image", no_decoding)
    monkeypatch.setattr(folders, "read_label", no_decoding)
    with pytest.raises(DataError, match=r"masks/train/s003\.png is \(6, 8\) but image .*images/train/s003\.png "
                                        r"is \(6, 7\)"):
        ds.validate()


def test_validate_samples_label_values_and_full_checks_all(tmp_path):
    ds = _generic(tmp_path, 40)
    sample = folders.sample_indices(40)
    assert sample == folders.sample_indices(40) and len(sample) == 32 and sample[0] == 0 and sample[-1] == 39
    inside = sample[len(sample) // 2]
    outside = next(i for i in range(40) if i not in sample)
    lab = RNG.integers(1, 3, (6, 7))
    lab[2, 3] = 9
    _lbl(tmp_path / f"masks/train/s{outside:03d}.png", lab)
    ds.validate()  # the bad map is not in the sample
    with pytest.raises(DataError, match=rf"s{outside:03d}\.png holds class 9, but folder has 3 classes \(ids 0\.\.2"):
        ds.validate(full=True)
    _lbl(tmp_path / f"masks/train/s{inside:03d}.png", lab)
    with pytest.raises(DataError, match=rf"s{inside:03d}\.png holds class 9"):
        ds.validate()
