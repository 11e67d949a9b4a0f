"""Official SenFormer checkpoints -> our models: preset inference, exact key/shape mapping for every
preset and both sharing modes, strict loading, lossless round trip, actionable errors, the CLI.

No official file can be downloaded here: checkpoints are generated in the official naming and
shapes (``random_official_state_dict``) with random values.
"""
import warnings

import pytest
import torch

from senformer.convert import (MismatchError, build_from_checkpoint, build_kwargs, expected_shapes, from_official,
                               is_official, load_checkpoint, to_official)
from senformer.cli import convert_main as main
from senformer.convert.infer import infer_official
from senformer.convert.mapping import official_to_ours
from senformer.convert.official_layout import official_config, random_official_state_dict
from senformer.convert.reading import read_metadata
from senformer.convert.report import check_against

CLASSES = {"senformer_r50": 150, "senformer_r101": 171, "senformer_swin_t": 19, "senformer_swin_s": 60,
           "senformer_swin_b": 150, "senformer_swin_l": 171}
UNUSED = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")


@pytest.mark.parametrize("sharing", ["repeated", "none"])
@pytest.mark.parametrize("preset", sorted(CLASSES))
def test_every_preset_maps_exactly_onto_the_model(preset, sharing):
    """Shapes only (meta tensors): each official key lands on a model key of the same shape, and
    every model key is filled, for all six backbones and both sharing modes."""
    cfg = official_config(preset, num_classes=CLASSES[preset])
    sd = random_official_state_dict(cfg, only_first_block=sharing == "repeated", device="meta")
    info = infer_official(sd)
    assert (info.name, info.num_classes, info.weight_sharing, info.num_blocks) == (preset, CLASSES[preset], sharing, 6)
    if "swin" in preset:
        assert info.config.window_size == cfg.window_size
    ours, unknown, dropped = official_to_ours(sd, keep_blocks=1 if sharing == "repeated" else None)
    assert unknown == [] and set(UNUSED) <= set(dropped)
    check_against(ours, expected_shapes(info), strict=True)


@pytest.fixture(scope="module")
def r50():
    """An official ResNet-50 file as the released code saves a weight-shared model: 6 equal blocks."""
    return random_official_state_dict(official_config("senformer_r50", num_classes=19), repeated=True, seed=1)


@pytest.fixture(scope="module")
def r50_model(r50):
    from senformer.models.zoo import build_model

    info = infer_official(r50)
    return build_model(info.name, **build_kwargs(info))


def assert_round_trip(official, model, info):
    back = to_official(model.state_dict(), info)
    assert set(back) == set(official) - set(UNUSED)
    for k, v in back.items():
        assert v.dtype == official[k].dtype and torch.equal(v, official[k]), k


def test_r50_weight_shared_loads_strictly_and_round_trips(r50, r50_model):
    info, ours = from_official(r50)
    assert (info.name, info.num_classes, info.weight_sharing, info.num_blocks) == ("senformer_r50", 19, "repeated", 6)
    r50_model.load_state_dict(ours, strict=True)
    assert_round_trip(r50, r50_model, info)
    # the stem renaming is what it claims: mmseg's stem.7 is the BN after the third stem conv
    assert torch.equal(r50_model.backbone.body.bn1.running_var, r50["backbone.stem.7.running_var"])


def test_r50_distinct_blocks_load_as_none_and_round_trip():
    from senformer.models.zoo import build_model

    cfg = official_config("senformer_r50", num_classes=7, num_blocks=2)  # branch_depth=2 keeps it small
    sd = random_official_state_dict(cfg, seed=2)
    info, ours = from_official(sd)
    assert (info.weight_sharing, info.num_blocks) == ("none", 2)
    model = build_model(info.name, **build_kwargs(info))
    model.load_state_dict(ours, strict=True)
    assert_round_trip(sd, model, info)


def test_swin_t_single_stored_block_loads_and_round_trips():
    from senformer.models.zoo import build_model

    sd = random_official_state_dict(official_config("senformer_swin_t", num_classes=19), only_first_block=True, seed=3)
    info, ours = from_official(sd)
    assert (info.weight_sharing, info.num_blocks) == ("repeated", 6)
    model = build_model(info.name, **build_kwargs(info))
    model.load_state_dict(ours, strict=True)
    back = to_official(model.state_dict(), info)
    for k, v in sd.items():  # the single stored block comes back as layers.0 (and copies in layers.1..5)
        if k not in UNUSED:
            assert torch.equal(back[k], v), k


def test_load_checkpoint_detects_official_and_ours(r50, r50_model, tmp_path):
    from safetensors.torch import save_file

    info = load_checkpoint(r50_model, r50)
    assert info is not None and info.name == "senformer_r50"
    ours = {k: v.clone() for k, v in r50_model.state_dict().items()}
    path = tmp_path / "ours.safetensors"
    save_file(ours, str(path))
    r50_model.head.learners[0].cls_emb.data.zero_()
    assert load_checkpoint(r50_model, path) is None
    assert torch.equal(r50_model.head.learners[0].cls_emb, ours["head.learners.0.cls_emb"])
    bad = dict(ours)
    bad["neck.lateral_convs.0.weight"] = torch.randn(3, 3)
    with pytest.raises(MismatchError, match=r"neck\.lateral_convs\.0\.weight: file \(3, 3\), model expects"):
        load_checkpoint(r50_model, bad)


def test_missing_and_unknown_keys_are_named_with_shapes(r50, r50_model):
    sd = dict(r50)
    del sd["backbone.layer1.0.conv1.weight"]
    sd["decode_head.learners.0.extra.weight"] = torch.randn(4)
    with pytest.raises(MismatchError) as e:
        from_official(sd)
    msg = str(e.value)
    assert "backbone.body.layer1.0.conv1.weight (64, 64, 1, 1) <- backbone.layer1.0.conv1.weight" in msg
    assert "decode_head.learners.0.extra.weight (no counterpart in our model)" in msg
    assert "--strict false" in msg
    # nothing was loaded: the model still holds its own tensor for a key the file does carry
    before = r50_model.neck.lateral_convs[1].weight.clone()
    with pytest.raises(MismatchError):
        load_checkpoint(r50_model, sd)
    assert torch.equal(r50_model.neck.lateral_convs[1].weight, before)
    # strict=False loads the rest and says what it skipped
    with pytest.warns(UserWarning, match="backbone.body.layer1.0.conv1.weight"):
        load_checkpoint(r50_model, sd, strict=False)
    assert torch.equal(r50_model.neck.lateral_convs[1].weight, r50["neck.lateral_convs.1.conv.weight"])


def test_wrong_preset_and_foreign_files_are_refused(r50):
    with pytest.raises(ValueError, match="preset='senformer_swin_t' does not match.*senformer_r50"):
        from_official(r50, preset="senformer_swin_t")
    assert not is_official({"backbone.body.conv1.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not an official SenFormer or mmseg UperNet checkpoint"):
        from_official({"backbone.body.conv1.0.weight": torch.zeros(1)})
    odd = {k: v for k, v in r50.items() if not k.startswith("backbone.layer3.5.")}
    with pytest.raises(ValueError, match=r"blocks per stage \(3, 4, 5, 3\)"):
        from_official(odd)


def test_sharing_is_read_from_values_not_names(r50):
    sd = dict(r50)
    k = "decode_head.learners.2.layers.4.mlp.fc1.bias"
    sd[k] = sd[k] + 1e-6  # one block differs in one learner: the blocks are not shared
    assert infer_official(sd).weight_sharing == "none"


class NotATensor:
    pass


@pytest.fixture(scope="module")
def r50_small():
    """A weight-shared ResNet-50 file that stores only layers.0 (a quarter of the head's size)."""
    return random_official_state_dict(official_config("senformer_r50", num_classes=19), only_first_block=True, seed=4)


def test_cli_converts_an_mmcv_checkpoint(r50_small, tmp_path, capsys):
    r50 = r50_small
    src, dst = tmp_path / "senformer_r50_512x512_ade20k.pth", tmp_path / "r50.safetensors"
    torch.save({"meta": {"CLASSES": ("wall",) * 19, "mmcv_version": "1.4.0"}, "state_dict": r50}, src)
    assert main([str(src), str(dst)]) == 0
    assert "senformer_r50, 19 classes, weight sharing 'repeated'" in capsys.readouterr().out
    meta = read_metadata(dst)
    assert (meta["preset"], meta["num_classes"], meta["weight_sharing"], meta["num_blocks"]) == \
        ("senformer_r50", "19", "repeated", "6")
    model = build_from_checkpoint(dst)
    back = to_official(model.state_dict(), infer_official(r50))
    assert all(torch.equal(back[k], v) for k, v in r50.items() if k not in UNUSED)
    # a file converted before the build arguments were stored whole still rebuilds
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old.safetensors"
    legacy = {k: v for k, v in meta.items() if k not in ("build_kwargs", "arch")}
    save_file(load_file(str(dst)), str(old), metadata=legacy)
    assert build_from_checkpoint(old).head.learners[0].decoder.num_blocks == 6

    assert main([str(src), str(dst), "--preset", "senformer_r101"]) == 1
    assert "does not match" in capsys.readouterr().err
    # a file that weights_only loading refuses is not unpickled unless trusted
    risky = tmp_path / "risky.pth"
    torch.save({"meta": {"obj": NotATensor()}, "state_dict": r50}, risky)
    assert main([str(risky), str(dst)]) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert main([str(risky), str(dst), "--trust-pickle"]) == 0


def test_cli_strict_false_converts_the_matching_part(r50_small, tmp_path, capsys):
    sd = dict(r50_small)
    sd["decode_head.unused.weight"] = torch.randn(2)
    src, dst = tmp_path / "x.pth", tmp_path / "x.safetensors"
    torch.save({"state_dict": sd}, src)
    assert main([str(src), str(dst)]) == 1
    assert "decode_head.unused.weight" in capsys.readouterr().err
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert main([str(src), str(dst), "--strict", "false"]) == 0


@pytest.fixture(scope="module")
def r50_nws():
    """An official ResNet-50 file of a model trained without weight sharing (distinct blocks); width 64
    and 2 blocks keep it small."""
    return random_official_state_dict(official_config("senformer_r50", num_classes=7, num_blocks=2, dim=64), seed=5)


def test_build_model_refuses_a_whole_model_file_and_names_the_call(r50_nws, tmp_path):
    """backbone_weights= / pretrained= take backbone files; an official or own whole-model file is refused
    with what it holds and the call that loads it, and that call works."""
    from senformer.models.checkpoint_kind import WholeModelCheckpointError
    from senformer.models.zoo import build_model

    official = tmp_path / "official_nws.pth"
    torch.save({"state_dict": r50_nws, "meta": {}}, official)
    with pytest.raises(WholeModelCheckpointError) as e:
        build_model("senformer_r50", backbone_weights=str(official))
    msg = str(e.value)
    assert "official SenFormer, weight_sharing='none', 2 distinct blocks per learner, 7 classes" in msg
    assert f"senformer.convert.build_from_checkpoint({str(official)!r})" in msg and "senformer-convert" in msg
    # the deprecated alias means the same (backbone weights) and says so
    with pytest.warns(FutureWarning, match="backbone_weights"), pytest.raises(WholeModelCheckpointError):
        build_model("senformer_r50", pretrained=str(official))

    model = build_from_checkpoint(str(official))
    head = model.head.learners[0].decoder
    assert (model.preset, len(head.blocks), model.num_classes) == ("senformer_r50", 2, 7)
    assert torch.equal(head.blocks[1].mlp.fc1.weight, r50_nws["decode_head.learners.0.layers.1.mlp.fc1.weight"])


def test_own_whole_model_files_load_through_the_converter_only(r50_nws, tmp_path):
    from safetensors.torch import save_file

    from senformer.models.checkpoint_kind import WholeModelCheckpointError
    from senformer.models.zoo import build_model

    info = infer_official(r50_nws)
    model = build_from_checkpoint(r50_nws)
    ours = tmp_path / "ours.safetensors"  # what a training checkpoint holds: no preset in the metadata
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ours))
    with pytest.raises(WholeModelCheckpointError, match=r"\(senformer\).*preset='senformer_r50'"):
        build_model("senformer_r50", backbone_weights=str(ours))
    with pytest.raises(ValueError, match="pass preset="):
        build_from_checkpoint(ours)
    again = build_from_checkpoint(ours, preset="senformer_r50", **build_kwargs(info))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(ValueError, match="preset='senformer_r101' does not match"):
        build_from_checkpoint(r50_nws, preset="senformer_r101")


def test_predict_cli_runs_an_official_checkpoint_directly(r50_small, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from senformer.cli import predict_main

    official = tmp_path / "senformer_r50_cityscapes.pth"
    torch.save({"state_dict": r50_small, "meta": {}}, official)
    img = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 67, 3)).astype(np.uint8)).save(img)
    out = tmp_path / "out"
    # the released config's sliding window at a small test scale (its 2048 x 1024 costs ~30 s on a CPU)
    assert predict_main([str(img), "-c", str(official), "-o", str(out), "--set", "data.dataset=cityscapes",
                         "--set", "data.scale=[256,128]", "--device", "cpu", "--outputs", "label"]) == 0
    label = np.asarray(Image.open(out / "label" / "street.png"))
    assert label.shape == (45, 67) and label.max() < 19
