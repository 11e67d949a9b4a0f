"""senformer.load / Segmenter.segment / save_pretrained / the Hub, as a user calls them.

The acceptance test trains the tiny preset a few steps, segments a real photograph (scikit-image's
bundled astronaut), and checks that save_pretrained -> load is bit-identical."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import senformer
from senformer.cli import train_main
from senformer.data.transforms import normalize
from senformer.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    assert train_main(["--model", "senformer_tiny", "--iters", "3", "--work-dir", str(wd), "--num-workers", "0",
                       "--no-progress", "--device", "cpu", "--set", "data.val_options.length=2",
                       "--set", "data.crop_size=[32,32]", "--set", "data.scale=[64,64]"]) == 0
    return wd


@pytest.fixture(scope="module")
def photo():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()[::3, ::2]  # 171x256: not square, not a multiple of the stride


def test_load_a_run_and_segment_a_photograph(run_dir, photo, tmp_path):
    model = senformer.load(run_dir)
    assert isinstance(model, senformer.Segmenter) and not model.training
    assert model.classes == ["background", "disk", "rectangle", "triangle", "ring"]
    assert model.palette.shape == (5, 3) and model.palette.dtype == np.uint8
    labels = model.segment(photo)
    assert labels.shape == photo.shape[:2] and labels.dtype == np.int64
    assert 0 <= labels.min() and labels.max() < 5
    labels2, probs = model.segment(photo, return_probs=True)
    np.testing.assert_array_equal(labels2, labels)
    assert probs.shape == (5, *photo.shape[:2]) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), labels)

    # save_pretrained -> load: the Hub layout, read back bit for bit
    saved = model.save_pretrained(tmp_path / "hub")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    info = json.loads((saved / "config.json").read_text())
    assert info["classes"] == model.classes and info["palette"] == model.palette.tolist()
    assert info["preset"] == "senformer_tiny" and info["config"]["data"]["root"] is None
    again = senformer.load(saved)
    _, probs_again = again.segment(photo, return_probs=True)
    assert np.array_equal(probs_again, probs)
    for a, b in zip(model.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)

    # a training checkpoint's weights file loads alone: the config rides in its header
    alone = tmp_path / "alone" / "weights.safetensors"
    alone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "iter_0000003" / "model.safetensors", alone)
    np.testing.assert_array_equal(senformer.load(alone).segment(photo), labels)


def test_segment_equals_the_official_whole_image_path(run_dir):
    """At a test scale that keeps the image's size, segment = Segmentor.predict(protocol="official")."""
    model = senformer.load(run_dir)
    img = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    labels, probs = model.segment(img, return_probs=True, scale=(70, 45))
    x = normalize(img).unsqueeze(0)
    expected = model.model.predict(x, protocol="official")[0].numpy()
    np.testing.assert_array_equal(labels, expected)
    # and the learners option scores a subset, as Segmentor.predict does
    sub = model.segment(img, scale=(70, 45), learners=[0, 2])
    np.testing.assert_array_equal(sub, model.model.predict(x, protocol="official", learners=[0, 2])[0].numpy())


def test_segment_hands_each_training_flag_back(run_dir):
    """segment runs in eval mode and restores every submodule's own flag (a frozen part stays in eval)."""
    model = senformer.load(run_dir)
    model.model.train()
    model.model.backbone.eval()
    flags = [m.training for m in model.model.modules()]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(m.training)) for m in model.model.modules()]
    model.segment(np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for h in hooks:
        h.remove()
    assert seen and not any(seen)
    assert [m.training for m in model.model.modules()] == flags


def test_segment_takes_paths_pil_arrays_and_lists(run_dir, tmp_path):
    model = senformer.load(run_dir, device="cpu")
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "im.png"
    Image.fromarray(img).save(path)
    ref = model.segment(img)
    np.testing.assert_array_equal(model.segment(str(path)), ref)
    np.testing.assert_array_equal(model.segment(path), ref)
    np.testing.assert_array_equal(model.segment(Image.fromarray(img)), ref)
    rgba = np.concatenate([img, rng.integers(0, 256, (40, 56, 1), dtype=np.uint8)], 2)
    np.testing.assert_array_equal(model.segment(rgba), ref)
    grey = img[:, :, 0]
    np.testing.assert_array_equal(model.segment(grey), model.segment(np.repeat(grey[:, :, None], 3, 2)))
    other = rng.integers(0, 256, (33, 21, 3), dtype=np.uint8)
    both = model.segment([img, other], progress=True)
    assert isinstance(both, list) and both[1].shape == (33, 21)
    np.testing.assert_array_equal(both[0], ref)


@pytest.mark.parametrize("bad, match", [
    (np.random.default_rng(0).random((8, 8, 3)), "must be uint8"),
    (np.zeros((8, 8, 5), np.uint8) + 7, "HxW, HxWx3 or HxWx4"),
    (torch.rand(1, 3, 8, 8), "model.predict"),
    (42, "expected a path"),
])
def test_segment_refuses_what_it_cannot_read(run_dir, bad, match):
    model = senformer.load(run_dir, device="cpu")
    with pytest.raises(UserError, match=match):
        model.segment(bad)


def test_segment_errors_name_the_problem(run_dir, tmp_path):
    model = senformer.load(run_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        model.segment(tmp_path / "nothere.png")
    with pytest.raises(TypeError, match="unknown setting"):
        model.segment(np.ones((8, 8, 3), np.uint8), scales=(1.0,))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        senformer.load(tmp_path / "missing_run")


def test_from_pretrained_reads_a_hub_cache_offline(run_dir, tmp_path, monkeypatch):
    """Nothing here reaches a hub: a snapshot laid out as huggingface_hub caches it is read offline."""
    pytest.importorskip("huggingface_hub")
    model = senformer.load(run_dir, device="cpu")
    commit = "1" * 40
    repo = tmp_path / "cache" / "models--alice--shapes-tiny"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    img = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for loaded in (senformer.from_pretrained("alice/shapes-tiny", device="cpu", cache_dir=tmp_path / "cache"),
                   senformer.load("alice/shapes-tiny", device="cpu", cache_dir=tmp_path / "cache")):
        assert loaded.classes == model.classes
        np.testing.assert_array_equal(loaded.segment(img), model.segment(img))


def test_push_to_hub_uploads_the_save_pretrained_folder(run_dir, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, **kw):
            from pathlib import Path
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            return "commit-info"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    model = senformer.load(run_dir, device="cpu")
    assert model.push_to_hub("alice/shapes-tiny", private=True, token="t") == "commit-info"
    assert calls["repo"] == ("alice/shapes-tiny", True, True) and calls["token"] == "t"
    assert calls["files"] == ["config.json", "model.safetensors"]
    assert calls["config"]["classes"] == model.classes


def test_an_official_checkpoint_loads_with_its_dataset(tmp_path):
    """An official .pth names no dataset: its class count does (19 -> Cityscapes names and test settings)."""
    from senformer.convert.official_layout import official_config, random_official_state_dict
    sd = random_official_state_dict(official_config("senformer_r50", num_classes=19), only_first_block=True, seed=4)
    path = tmp_path / "senformer_r50_cityscapes.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    model = senformer.load(path, device="cpu")
    assert model.classes[:3] == ["road", "sidewalk", "building"] and model.config["data"]["dataset"] == "cityscapes"
    assert model.test_settings["scale"] == (2048, 1024)
    saved = model.save_pretrained(tmp_path / "hub")
    again = senformer.load(saved, device="cpu")
    assert again.classes == model.classes and again.config["model"] == model.config["model"]
    img = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(again.segment(img, scale=(40, 24)), model.segment(img, scale=(40, 24)))


def test_list_models_and_help_need_no_torch():
    models = senformer.list_models()
    from senformer.models import PRESETS
    assert list(models) == list(PRESETS) and all(len(d) > 20 for d in models.values())
    code = ("import sys, senformer, senformer.cli as c\n"
            "texts = [c.train_parser().format_help(), c.eval_parser().format_help(), "
            "c.predict_parser().format_help(), c.export_parser().format_help(), c.convert_parser().format_help()]\n"
            "senformer.list_models()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print('\\n'.join(texts))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: [])" not in out
    assert "senformer_tiny" in out and "ade20k_r50" in out  # the presets are listed


def test_a_zoo_model_wrapped_by_hand_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    net = senformer.build_model("senformer_tiny", num_classes=3, levels=(2, 4)).eval()
    seg = senformer.Segmenter(net, ["sky", "road", "car"])
    assert seg.config["model"] == {"preset": "senformer_tiny", "pretrained": None, "kwargs": {"levels": [2, 4]}}
    again = senformer.load(seg.save_pretrained(tmp_path / "m"), device="cpu")
    img = np.random.default_rng(6).integers(0, 256, (50, 38, 3), dtype=np.uint8)
    assert np.array_equal(again.segment(img, return_probs=True)[1], seg.segment(img, return_probs=True)[1])
    assert again.classes == ["sky", "road", "car"]
    with pytest.raises(ValueError, match="2 class names"):
        senformer.Segmenter(net, ["a", "b"])
