"""Segmentor behaviour on the small preset: merges, levels, necks, losses, prediction modes, pretrained loading."""
import pytest
import torch
import torch.nn.functional as F

from senformer import build_model, ops
from senformer.models.backbones import TimmBackbone
from senformer.models.necks import SwinWindowBlock

N = 7


def tiny(**kw):
    torch.manual_seed(0)
    return build_model("senformer_tiny", num_classes=N, **kw)


def data(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randint(0, N, (b, h, w), generator=g)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_forward_train_and_eval_outputs():
    model = tiny()
    x, _ = data(h=96, w=64)
    logits = model(x)
    assert isinstance(logits, list) and [t.shape[-2:] for t in logits] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    assert all(t.shape[:2] == (2, N) for t in logits)
    model.eval()
    with torch.no_grad():
        probs = model(x)
        ref = ops.reference.merged_scores(model.learner_logits(x), "mean")
    assert probs.shape == (2, N, 24, 16)
    assert rel(probs, ref) < 1e-6


def test_loss_matches_reference_and_handles_ignored():
    model = tiny()
    model.eval()  # deterministic: no dropout, BN running stats
    x, y = data(h=64, w=48)
    y[0, :10] = 255
    out = model.loss(x, y)
    logits = model.learner_logits(x)
    le, ll = ops.reference.ensemble_cross_entropy([t.double() for t in logits], y)
    assert abs(out["loss_ensemble"].item() - le.item()) < 1e-4 * le.item()
    assert abs(out["loss_learners"].item() - ll.item()) < 1e-4 * ll.item()
    aux = F.interpolate(model.aux_head(model.backbone(x)[2]), size=(64, 48), mode="bilinear", align_corners=False)
    # official default: mmseg 0.20 CrossEntropyLoss, mean over ALL pixels
    official = F.cross_entropy(aux, y, ignore_index=255, reduction="none").mean()
    assert abs(out["loss_aux"].item() - official.item()) < 1e-4
    y_all = torch.full_like(y, 255)
    out = model.loss(x, y_all)
    assert all(v.item() == 0 for v in out.values())
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError):
        model.loss(x, torch.full_like(y, N))


def _mmseg_cross_entropy(logits, target, avg_non_ignore):
    """mmseg's CrossEntropyLoss: per-pixel CE (0 at ignored pixels), then a mean over all pixels, or
    (``avg_non_ignore``, mmseg >= 0.24) over the non-ignored ones."""
    loss = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    return loss.sum() / (target != 255).sum() if avg_non_ignore else loss.mean()


@pytest.mark.parametrize("avg_non_ignore", [False, True])
@pytest.mark.parametrize("preset", ["senformer_tiny", "upernet_r50"])
def test_aux_and_single_output_loss_normalisation(preset, avg_non_ignore):
    torch.manual_seed(1)
    model = build_model(preset, num_classes=N, backbone="resnet18", channels=32, aux_channels=16,
                        avg_non_ignore=avg_non_ignore).double().eval()
    x, y = data(h=50, w=38, seed=3)
    x = x.double()
    y[0, :17] = 255
    y[1, :, 5:9] = 255
    out = model.loss(x, y)
    feats = model.backbone(x)
    aux = F.interpolate(model.aux_head(feats[2]), size=(50, 38), mode="bilinear", align_corners=False)
    want = _mmseg_cross_entropy(aux, y, avg_non_ignore)
    assert abs(out["loss_aux"].item() - want.item()) <= 1e-12 * want.item()
    valid_fraction = (y != 255).double().mean().item()
    assert 0.5 < valid_fraction < 0.95  # the two settings differ by exactly this factor
    if preset == "upernet_r50":
        z = F.interpolate(model.head(feats)[0], size=(50, 38), mode="bilinear", align_corners=False)
        want = _mmseg_cross_entropy(z, y, avg_non_ignore)
        assert abs(out["loss_ensemble"].item() - want.item()) <= 1e-12 * want.item()
    else:
        # the SenFormer head's own losses average over valid pixels in either setting (official)
        le, ll = ops.reference.ensemble_cross_entropy(model.learner_logits(x), y)
        assert abs(out["loss_ensemble"].item() - le.item()) <= 1e-12 * le.item()
        assert abs(out["loss_learners"].item() - ll.item()) <= 1e-12 * ll.item()


def test_paper_presets_use_the_official_normalisation():
    from senformer.models.zoo import PRESETS

    assert all(cfg["avg_non_ignore"] is False for cfg in PRESETS.values())


@pytest.mark.parametrize("merge", ["mean", "product", "vote", "hierarchical", "explicit"])
def test_every_merge_builds_trains_and_predicts(merge):
    model = tiny(merge=merge, num_blocks=1)
    x, y = data()
    out = model.loss(x, y)
    out["loss"].backward()
    if model.merger is not None:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.merger.parameters())
        assert out["loss_ensemble"].item() != out["loss_learners"].item()
    model.eval()
    with torch.no_grad():
        probs = model(x)
    assert probs.shape == (2, N, 16, 16) and torch.isfinite(probs).all()
    total = probs.sum(1)
    if merge == "vote":  # each learner keeps only its top class's probability (paper eq. 5)
        assert (total <= 1 + 1e-6).all() and (total > 0).all()
    else:
        assert torch.allclose(total, torch.ones(()), atol=1e-5)
    labels = model.predict(x, protocol="fast")  # fast: the merged probabilities resized once
    assert labels.shape == (2, 64, 64) and labels.dtype == torch.int64
    assert torch.equal(labels, F.interpolate(probs, size=(64, 64), mode="bilinear").argmax(1))
    assert model.predict(x).shape == (2, 64, 64)  # official (tests/test_protocol.py)


def test_learned_merge_constraints():
    model = tiny()
    x, _ = data(b=1)
    with pytest.raises(ValueError, match="hierarchical"):
        model.predict(x, merge="hierarchical")
    model = tiny(merge="explicit")
    with pytest.raises(ValueError, match="learners"):
        model.predict(x, learners=[0, 1])
    assert model.predict(x, merge="vote").shape == (1, 64, 64)


@pytest.mark.parametrize("sharing", ["repeated", "none", "decoder", "cls"])
def test_weight_sharing_modes_train(sharing):
    model = tiny(weight_sharing=sharing, num_blocks=2)
    x, y = data(h=32, w=32)
    model.loss(x, y)["loss"].backward()
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("neck", ["fpnt", "fpn", "none"])
def test_necks(neck):
    model = tiny(neck=neck, num_blocks=1, levels=(3, 5))
    assert len(model.head.learners) == 2
    x, y = data(h=64, w=32)
    logits = model(x)
    assert [t.shape[-2:] for t in logits] == [(8, 4), (2, 1)]
    model.loss(x, y)["loss"].backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, N, 16, 8)  # 1/4 resolution even without a P2 learner


def test_learners_per_level_and_subsets():
    model = tiny(learners_per_level=2, num_blocks=1)
    model.eval()
    x, _ = data(b=1)
    logits = model.learner_logits(x)
    assert len(logits) == 8 and model.head.learner_levels == [2, 2, 3, 3, 4, 4, 5, 5]
    only = model.predict(x, learners=[6], protocol="fast")
    up = F.interpolate(torch.softmax(logits[6], 1), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(only, up.argmax(1))
    pair = model.predict(x, learners=[1, 7], merge="product", protocol="fast")
    assert torch.equal(pair, ops.reference.ensemble_predict([logits[1], logits[7]], (64, 64), "product"))
    with pytest.raises(ValueError, match="learners"):
        model.predict(x, learners=[8])


def test_predict_whole_and_slide():
    model = tiny(num_blocks=1)
    x, _ = data(b=2, h=70, w=90)
    whole = model.predict(x)
    assert whole.shape == (2, 70, 90) and whole.dtype == torch.int64
    assert model.predict(x, size=(35, 45)).shape == (2, 35, 45)
    slide = model.predict(x, mode="slide", crop=(64, 64), stride=(40, 40))
    assert slide.shape == (2, 70, 90) and slide.dtype == torch.int64
    assert model.predict(x, mode="slide", crop=128, stride=96).shape == (2, 70, 90)  # crop larger: padded
    assert model.training  # predict restores the mode
    # one crop covering the whole image reproduces the whole-image prediction
    x64, _ = data(b=1, h=64, w=96)
    assert torch.equal(model.predict(x64, mode="slide", crop=(64, 96), stride=(64, 96)), model.predict(x64))
    with pytest.raises(ValueError, match="mode"):
        model.predict(x, mode="tiles")


def test_baselines():
    x, y = data(b=2, h=64, w=64)
    for preset in ("upernet_r50", "senupernet_r50", "fusion_baseline_r50"):
        torch.manual_seed(0)
        model = build_model(preset, num_classes=N, backbone="resnet18", channels=32, embed_dim=32, num_heads=4,
                            num_blocks=1, aux_channels=16)
        out = model.loss(x, y)
        if model.head.num_outputs == 1:
            assert out["loss_learners"].item() == 0
        else:
            assert len(model.head.learners) == 4
        out["loss"].backward()
        model.eval()
        assert model.predict(x).shape == (2, 64, 64)


def test_swin_backbone_is_nchw_and_window_block_pads():
    bb = TimmBackbone("swin_tiny_patch4_window7_224", img_size=64, window_size=7)
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == bb.channels == [96, 192, 384, 768]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and all(f.is_contiguous() for f in feats)
    # any input size: padded to the patch size (4), windows padded inside timm
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 38, 70))] == [(10, 18), (5, 9), (3, 5), (2, 3)]
    blk = SwinWindowBlock(16, num_heads=4, window_size=7).double()
    z = torch.randn(2, 16, 9, 12, dtype=torch.float64)
    out = blk(z)
    assert out.shape == z.shape
    # windows do not mix: changing a pixel of window (0,0) leaves window (1,1) unchanged
    z2 = z.clone()
    z2[:, :, 0, 0] += 1
    out2 = blk(z2)
    assert torch.equal(out[:, :, 7:, 7:], out2[:, :, 7:, 7:]) and not torch.equal(out[:, :, :7, :7], out2[:, :, :7, :7])


def test_backbone_weights_loading(tmp_path):
    import timm
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny(backbone_weights=str(tmp_path / "nope.pth"))
    src = timm.create_model("resnet18", pretrained=False)  # a classifier checkpoint: fc.* is ignored
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "r18.safetensors"))
    torch.save({"state_dict": {"backbone." + k: v for k, v in sd.items()}}, tmp_path / "r18.pth")
    for name in ("r18.safetensors", "r18.pth"):
        model = tiny(backbone_weights=str(tmp_path / name))
        assert torch.equal(model.backbone.body.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])
    bad = dict(sd)
    bad.pop("layer2.0.bn1.weight")
    bad["extra.weight"] = torch.zeros(1)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        tiny(backbone_weights=str(tmp_path / "bad.pth"))
    msg = str(err.value)
    assert "layer2.0.bn1.weight" in msg and "extra.weight" in msg and "conv1.weight" in msg


def test_pretrained_swin_keys_map(tmp_path):
    import timm

    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64)
    torch.save(src.state_dict(), tmp_path / "swin.pth")
    bb = TimmBackbone("swin_tiny_patch4_window7_224", img_size=64, pretrained=str(tmp_path / "swin.pth"))
    assert torch.equal(bb.body.layers_2.blocks[3].mlp.fc1.weight, src.layers[2].blocks[3].mlp.fc1.weight)


def test_tiny_preset_learns_on_cpu():
    """A few AdamW steps on one 128x128 batch must lower the loss: the small preset is a usable CPU demo."""
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 128, generator=g)
    y = (x[:, 0] > 0).long() * 3 + (x[:, 1] > 0).long()  # labels a model can read off the pixels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model.loss(x, y)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("sharing", ["repeated", "decoder"])
def test_cache_kv_whole_model_float64(sharing):
    model = tiny(weight_sharing=sharing, num_blocks=3, repeat_block=True).double()
    x, y = data(h=48, w=40)
    x = x.double()

    def run(cache):
        model.head.cache_kv = cache
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # same dropout masks in the auxiliary head
        out = model.loss(x, y)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l1, g1 = run(True)
    l0, g0 = run(False)
    assert abs(l1.item() - l0.item()) <= 1e-10 * abs(l0.item())
    for name, g in g1.items():
        assert (g - g0[name]).norm() <= 1e-10 * g0[name].norm().clamp_min(1e-30), name
