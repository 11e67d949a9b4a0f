"""Every preset of the zoo builds, trains one step (forward + backward) on CPU, and overrides are validated."""
import math

import pytest
import torch

from senformer import build_model
from senformer.models import OVERRIDES, PRESETS

NUM_CLASSES = 7
SLOW = pytest.mark.slow  # > 20 s on CPU: -m slow
# Swin-L at 128x128 takes > 20 s single-threaded on CPU: run with the slow tests only
FAST_PRESETS = [p for p in PRESETS if p != "senformer_swin_l"]


def _train_step(model, size, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=g)
    target = torch.randint(0, NUM_CLASSES, (batch, *size), generator=g)
    target[:, :5, :7] = 255  # some ignored pixels
    model.train()
    losses = model.loss(images, target)
    assert set(losses) == {"loss", "loss_ensemble", "loss_learners", "loss_aux"}
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    expect = losses["loss_ensemble"] + losses["loss_learners"] + 0.4 * losses["loss_aux"]
    assert math.isclose(losses["loss"].item(), expect.item(), rel_tol=1e-6)
    assert losses["loss_aux"].item() > 0
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"
    assert any(p.grad.abs().sum().item() > 0 for p in model.head.parameters())
    return losses


def _check_preset(name, size=(128, 128), eval_too=False):
    torch.manual_seed(0)
    model = build_model(name, num_classes=NUM_CLASSES, img_size=size[0])
    assert model.num_classes == NUM_CLASSES and model.align_corners is False
    assert model.aux_head is not None and hasattr(model.head, "levels")
    _train_step(model, size)
    if not eval_too:
        return
    model.eval()
    with torch.no_grad():
        probs = model(torch.randn(1, 3, *size))
    assert probs.shape == (1, NUM_CLASSES, size[0] // 4, size[1] // 4)
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("name", FAST_PRESETS)
def test_preset_trains_one_step(name):
    # eval-mode forward of the big presets adds time, not coverage: done for one CNN and one Swin preset
    _check_preset(name, eval_too=name in ("senformer_tiny", "senformer_swin_t"))


@SLOW
def test_swin_l_trains_one_step():
    _check_preset("senformer_swin_l")


@SLOW
def test_r50_at_512():
    _check_preset("senformer_r50", (512, 512), eval_too=True)


def test_preset_configs_follow_the_paper():
    for name in ("senformer_swin_b", "senformer_swin_l"):
        assert PRESETS[name]["img_size"] == 640 and PRESETS[name]["window_size"] == 12
    for name in ("senformer_swin_t", "senformer_swin_s"):
        assert PRESETS[name]["img_size"] == 512 and PRESETS[name]["window_size"] == 7
    r50 = PRESETS["senformer_r50"]
    assert (r50["backbone"], r50["embed_dim"], r50["num_heads"], r50["num_blocks"]) == ("resnet50c", 512, 8, 6)
    assert (r50["weight_sharing"], r50["neck"], r50["merge"], r50["cache_kv"]) == ("repeated", "fpnt", "mean", True)


def test_r50_deep_stem_and_sizes():
    model = build_model("senformer_r50", num_classes=150)
    stem = model.backbone.body.conv1
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(3, 32, (3, 3)), (32, 32, (3, 3)), (32, 64, (3, 3))]
    assert model.backbone.channels == [256, 512, 1024, 2048] and model.backbone.reductions == [4, 8, 16, 32]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # paper: 55M without / ~60M with the auxiliary head; one learner ~4.2M at d=512
    assert 54.5e6 < count(model) - count(model.aux_head) < 56e6
    assert 4.1e6 < count(model.head.learners[0]) < 4.4e6
    block = count(model.head.learners[0].decoder.blocks[0])
    assert 143e6 < count(model) + 4 * 5 * block < 145e6  # Table 2, no sharing: 144M (aux head included)


def test_unknown_override_lists_valid_ones():
    with pytest.raises(TypeError) as err:
        build_model("senformer_tiny", num_classes=3, num_layers=4)
    msg = str(err.value)
    assert "num_layers" in msg and all(k in msg for k in ("weight_sharing", "cache_kv", "levels", "backbone"))
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("senformer_r18")
    for key in ("weight_sharing", "num_blocks", "cache_kv", "neck", "merge", "levels", "post_norm", "backbone_weights",
                "pretrained", "img_size", "backbone", "embed_dim", "num_heads", "learners_per_level", "aux"):
        assert key in OVERRIDES


def test_any_timm_backbone_and_bad_names():
    model = build_model("senformer_tiny", num_classes=3, backbone="efficientnet_b0", aux=False)
    assert model.aux_head is None and len(model.backbone.channels) == 4
    assert model.predict(torch.randn(1, 3, 64, 64)).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="no model named"):
        build_model("senformer_tiny", num_classes=3, backbone="resnet_does_not_exist")
    with pytest.raises(ValueError, match="neck"):
        build_model("senformer_tiny", num_classes=3, neck="bifpn")
    with pytest.raises(ValueError, match="merge"):
        build_model("senformer_tiny", num_classes=3, merge="max")


def test_backbone_weights_and_the_deprecated_pretrained_alias(tmp_path):
    """backbone_weights= loads a backbone file; pretrained= still does, with a FutureWarning naming the
    new argument; the two disagreeing is an error. Whole-model files: tests/test_convert_official.py."""
    import warnings

    import timm
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    path = str(tmp_path / "r18.safetensors")
    save_file(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        model = build_model("senformer_tiny", num_classes=3, backbone_weights=path)
    assert torch.equal(model.backbone.body.layer2[0].conv1.weight, sd["layer2.0.conv1.weight"])
    with pytest.warns(FutureWarning, match="use backbone_weights="):
        old = build_model("senformer_tiny", num_classes=3, pretrained=path)
    assert torch.equal(old.backbone.body.layer2[0].conv1.weight, sd["layer2.0.conv1.weight"])
    with pytest.raises(ValueError, match="disagree"):
        build_model("senformer_tiny", num_classes=3, backbone_weights=path, pretrained=str(tmp_path / "other.pth"))
