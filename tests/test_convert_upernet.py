"""mmseg 0.20 UperNet checkpoints -> our upernet presets through the same converter as the official
SenFormer files: preset inference, exact key/shape mapping, strict loading, lossless round trip (the
classifier ``decode_head.conv_seg`` included), ``senformer-convert`` / ``python -m senformer.cli
convert``, the eval/predict CLIs, and the errors for what the zoo has no preset for.

No mmseg file can be downloaded here: checkpoints are generated in mmseg's naming and shapes
(``random_official_state_dict``) with random values; the test below pins that layout to keys read
off mmseg's UPerHead / PPM / FCNHead and mmcv's ConvModule.
"""
import subprocess
import sys

import pytest
import torch

from senformer.convert import (MismatchError, build_from_checkpoint, build_kwargs, expected_shapes, from_official,
                               is_official, load_checkpoint, to_official)
from senformer.cli import convert_main as main
from senformer.convert.infer import infer_official
from senformer.convert.mapping import official_to_ours
from senformer.convert.official_layout import official_config, official_shapes, random_official_state_dict
from senformer.convert.reading import read_metadata
from senformer.convert.report import check_against

CLASSES = {"upernet_r50": 150, "upernet_swin_t": 19}


def test_upernet_layout_is_mmsegs():
    """Keys and shapes written out by hand from mmseg 0.20 (uper_head.py, psp_head.py, fcn_head.py,
    decode_head.py) and mmcv's ConvModule (``conv`` without bias next to a norm, the BN named ``bn``)."""
    shapes = official_shapes(official_config("upernet_r50"))
    want = {
        "decode_head.conv_seg.weight": (150, 512, 1, 1), "decode_head.conv_seg.bias": (150,),
        "decode_head.psp_modules.0.1.conv.weight": (512, 2048, 1, 1),
        "decode_head.psp_modules.3.1.bn.running_var": (512,),
        "decode_head.psp_modules.3.1.bn.num_batches_tracked": (),
        "decode_head.bottleneck.conv.weight": (512, 2048 + 4 * 512, 3, 3),
        "decode_head.lateral_convs.0.conv.weight": (512, 256, 1, 1),
        "decode_head.lateral_convs.2.conv.weight": (512, 1024, 1, 1),
        "decode_head.fpn_convs.1.conv.weight": (512, 512, 3, 3),
        "decode_head.fpn_bottleneck.conv.weight": (512, 4 * 512, 3, 3),
        "decode_head.fpn_bottleneck.bn.weight": (512,),
        "auxiliary_head.convs.0.conv.weight": (256, 1024, 3, 3),
        "auxiliary_head.conv_seg.weight": (150, 256, 1, 1),
        "backbone.stem.0.weight": (32, 3, 3, 3),
    }
    assert {k: shapes[k] for k in want} == want
    head = [k for k in shapes if k.startswith("decode_head.")]
    # 12 ConvModules (4 PPM, bottleneck, 3 laterals, 3 fpn convs, fpn_bottleneck) x (conv + 5 BN entries) + conv_seg
    assert len(head) == 12 * 6 + 2
    assert not any(k.endswith("conv.bias") for k in shapes) and not any(k.startswith("neck.") for k in shapes)
    assert "decode_head.lateral_convs.3.conv.weight" not in shapes  # C5 goes through the PPM, not a lateral


@pytest.mark.parametrize("preset", sorted(CLASSES))
def test_upernet_maps_exactly_onto_the_model(preset):
    """Shapes only (meta tensors): every mmseg key lands on a model key of the same shape and fills it."""
    sd = random_official_state_dict(official_config(preset, num_classes=CLASSES[preset]), device="meta")
    assert is_official(sd)
    info = infer_official(sd)
    assert (info.name, info.arch, info.num_classes, info.weight_sharing) == (preset, "upernet", CLASSES[preset], None)
    ours, unknown, dropped = official_to_ours(sd, arch="upernet")
    assert unknown == [] and all(k.endswith("relative_position_index") for k in dropped)
    assert ours["head.conv_seg.weight"].shape == (CLASSES[preset], 512, 1, 1)  # the classifier, kept
    check_against(ours, expected_shapes(info), strict=True)


def small(preset, seed, **changes):
    """A narrow head (64 channels, aux 32) keeps files and models small; the backbone is real."""
    changes = {"num_classes": 19, "channels": 64, "aux_channels": 32, **changes}
    return random_official_state_dict(official_config(preset, **changes), seed=seed)


@pytest.fixture(scope="module")
def r50():
    return small("upernet_r50", seed=21)


@pytest.mark.parametrize("preset", sorted(CLASSES))
def test_upernet_loads_strictly_and_round_trips(preset, r50):
    from senformer.models.zoo import build_model

    sd = r50 if preset == "upernet_r50" else small(preset, seed=22)
    info, ours = from_official(sd)
    assert (info.name, info.num_classes, info.config.channels, info.config.aux_channels) == (preset, 19, 64, 32)
    assert build_kwargs(info)["channels"] == 64
    model = build_model(info.name, **build_kwargs(info))
    model.load_state_dict(ours, strict=True)
    back = to_official(model.state_dict(), info)
    assert set(back) == set(sd)  # nothing dropped: conv_seg comes back too
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    assert torch.equal(model.head.fpn.psp_modules.stages[3][1][1].running_mean,
                       sd["decode_head.psp_modules.3.1.bn.running_mean"])
    # load_checkpoint recognises the file the same way
    model.head.conv_seg.weight.data.zero_()
    assert load_checkpoint(model, sd).name == preset
    assert torch.equal(model.head.conv_seg.weight, sd["decode_head.conv_seg.weight"])


def test_cli_and_python_m_convert_an_mmseg_upernet_checkpoint(r50, tmp_path, capsys):
    src, dst = tmp_path / "upernet_r50_512x512_160k_ade20k.pth", tmp_path / "upernet.safetensors"
    torch.save({"meta": {"CLASSES": ("wall",) * 19, "mmcv_version": "1.4.0"}, "state_dict": r50}, src)
    # python -m senformer.cli convert: the same command as senformer-convert
    run = subprocess.run([sys.executable, "-m", "senformer.cli", "convert", str(src), str(dst)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "upernet_r50, 19 classes, 412 tensors" in run.stdout
    meta = read_metadata(dst)
    assert (meta["arch"], meta["preset"], meta["num_classes"]) == ("upernet", "upernet_r50", "19")
    model = build_from_checkpoint(dst)
    assert model.preset == "upernet_r50" and model.head.conv_seg.out_channels == 19
    back = to_official(model.state_dict(), infer_official(r50))
    assert all(torch.equal(back[k], v) for k, v in r50.items())

    assert main([str(src), str(dst), "--preset", "senformer_r50"]) == 1
    assert "does not match" in capsys.readouterr().err


def test_upernet_without_a_zoo_preset_is_named():
    r101 = random_official_state_dict(official_config("upernet_r50", depths=(3, 4, 23, 3)), device="meta")
    with pytest.raises(ValueError, match=r"\(3, 4, 23, 3\) matches no upernet preset \(upernet_r50, upernet_swin_t"):
        from_official(r101)


def test_upernet_file_into_a_senformer_model_is_refused(r50):
    from senformer.models.zoo import build_model

    with torch.device("meta"):
        model = build_model("senformer_r50", num_classes=19)
    with pytest.raises(MismatchError, match="mmseg upernet_r50, 19 classes checkpoint does not match the model"):
        load_checkpoint(model, r50)


def test_build_model_refuses_an_upernet_file_and_names_the_call(r50, tmp_path):
    from senformer.models.checkpoint_kind import WholeModelCheckpointError
    from senformer.models.zoo import build_model

    path = tmp_path / "upernet.pth"
    torch.save({"state_dict": r50}, path)
    with pytest.raises(WholeModelCheckpointError) as e:
        build_model("upernet_r50", num_classes=19, backbone_weights=str(path))
    msg = str(e.value)
    assert "whole-model checkpoint (mmseg UperNet, 19 classes)" in msg
    assert f"senformer.convert.build_from_checkpoint({str(path)!r})" in msg
    model = build_from_checkpoint(str(path))
    assert torch.equal(model.head.fpn.bottleneck[0].weight, r50["decode_head.bottleneck.conv.weight"])


def test_eval_and_predict_take_an_mmseg_upernet_file_as_a_released_model(r50, tmp_path):
    """senformer-eval / -predict build a released model from the file itself (the CLI plumbing is run end
    to end for a SenFormer file in test_convert_official.py); the single-output model then predicts."""
    from senformer.engine.loading import released_model

    path = tmp_path / "upernet_r50_cityscapes.pth"
    torch.save({"state_dict": r50, "meta": {}}, path)
    state = released_model(path)
    assert state is not None and set(state) == set(r50)
    model = build_from_checkpoint(state).eval()
    with torch.no_grad():
        label = model.predict(torch.randn(1, 3, 45, 67), size=(45, 67))
    assert label.shape == (1, 45, 67) and int(label.max()) < 19
