"""protocol="official" against an independent re-implementation of mmseg 0.20's test path.

The reference below is written from the official code, not from senformer's: mmcv 1.x's rescale_size /
imrescale / imnormalize (cv2), mmseg's MultiScaleFlipAug + Resize + RandomFlip, the SenFormer head's
forward_test (SUM of the learners' softmaxes on the P2 grid), and EncoderDecoder's encode_decode /
whole_inference / slide_inference / inference / aug_test. Only the network itself (backbone, neck,
learners: ``learner_logits``) is senformer's. Everything runs in float64 on fresh random inputs with
ragged sizes; probabilities must agree to rel < 1e-10 and labels exactly.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from senformer import build_model
from senformer.data.transforms import aug_scales, normalize, rescale_size, resize_linear, resize_pillow
from senformer.engine.inference import infer_image
from senformer.ops import reference
from support import rel

cv2 = pytest.importorskip("cv2")

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
TOL = 1e-10


# ------------------------------------------------------------------ mmcv 1.x / mmseg 0.20, re-implemented
def mm_rescale_size(w, h, scale):
    """mmcv.rescale_size((w, h), scale) -> (new_w, new_h)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def mm_normalize(img):
    """mmseg Normalize (float32 mean/std) -> mmcv.imnormalize_: cv2.subtract, cv2.multiply by 1/std."""
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    out = img.copy().astype(np.float32)
    cv2.subtract(out, np.float64(mean.reshape(1, -1)), out)
    cv2.multiply(out, 1 / np.float64(std.reshape(1, -1)), out)
    return out


def mm_views(img, img_scale, ratios, flip):
    """MultiScaleFlipAug(img_scale, img_ratios, flip) over Resize(keep_ratio) / RandomFlip / Normalize:
    a list of (tensor (1,3,h,w) float64, flipped)."""
    scales = [(int(img_scale[0] * r), int(img_scale[1] * r)) for r in ratios]
    views = []
    for scale in scales:
        for flipped in ([False, True] if flip else [False]):
            h, w = img.shape[:2]
            im = cv2.resize(img, mm_rescale_size(w, h, scale), interpolation=cv2.INTER_LINEAR)
            if flipped:
                im = np.flip(im, axis=1)
            x = torch.from_numpy(mm_normalize(np.ascontiguousarray(im))).permute(2, 0, 1)[None].double()
            views.append((x, flipped))
    return views


def up(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class OfficialEncoderDecoder:
    """mmseg 0.20 EncoderDecoder(Custome) at test time around senformer's network."""

    def __init__(self, net, mode="whole", crop=None, stride=None, subset=None):
        self.net, self.mode, self.crop, self.stride, self.subset = net, mode, crop, stride, subset

    def decode_head_forward_test(self, img):
        logits = self.net.learner_logits(img)
        if self.net.head.num_outputs == 1:  # UPerHead.forward: logits at 1/4
            return logits[0]
        # SenFormer.forward: every learner resized to x[0] (P2), softmax, stacked and summed
        probs = [torch.softmax(up(x, logits[0].shape[2:]), dim=1) for x in logits]
        keep = range(len(probs)) if self.subset is None else self.subset
        return torch.stack([probs[i] for i in keep], dim=0).sum(dim=0)

    def encode_decode(self, img):
        return up(self.decode_head_forward_test(img), img.shape[2:])

    def slide_inference(self, img, ori_shape):
        h_stride, w_stride = self.stride
        h_crop, w_crop = self.crop
        b, _, h_img, w_img = img.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = count = None
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * h_stride, w_idx * w_stride
                y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop_seg_logit = self.encode_decode(img[:, :, y1:y2, x1:x2])
                if preds is None:
                    preds = img.new_zeros((b, crop_seg_logit.shape[1], h_img, w_img))
                    count = img.new_zeros((b, 1, h_img, w_img))
                preds += F.pad(crop_seg_logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
                count[:, :, y1:y2, x1:x2] += 1
        assert (count == 0).sum() == 0
        return up(preds / count, ori_shape)

    def whole_inference(self, img, ori_shape):
        return up(self.encode_decode(img), ori_shape)

    def inference(self, img, ori_shape, flipped):
        seg = self.slide_inference(img, ori_shape) if self.mode == "slide" else self.whole_inference(img, ori_shape)
        out = F.softmax(seg, dim=1)
        return out.flip(dims=(3,)) if flipped else out

    def aug_test(self, views, ori_shape):
        seg = self.inference(views[0][0], ori_shape, views[0][1])
        for x, flipped in views[1:]:
            seg += self.inference(x, ori_shape, flipped)
        return seg / len(views)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def senformer():
    torch.manual_seed(0)
    return build_model("senformer_tiny", num_classes=7, aux=False).double().eval()


@pytest.fixture(scope="module")
def upernet():
    torch.manual_seed(1)
    return build_model("upernet_r50", num_classes=7, backbone="resnet18", channels=32, aux=False).double().eval()


@pytest.fixture(scope="module")
def photo():
    """A ragged 333x517 RGB image with photo-like structure (smooth shapes + noise + hard edges)."""
    rng = np.random.default_rng(2024)
    y, x = np.mgrid[0:333, 0:517].astype(np.float64)
    img = np.stack([128 + 90 * np.sin(x / 23 + c) * np.cos(y / 17 - c) for c in range(3)], -1)
    img[(x - 300) ** 2 + (y - 150) ** 2 < 70 ** 2] = (250, 30, 40)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def check(got, want):
    """float64 probabilities equal to rel < TOL, argmax labels identical; returns the rel error."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    err = rel(got, want)
    assert err < TOL, err
    assert torch.equal(got.argmax(1), want.argmax(1))
    return err


# ------------------------------------------------------------------ the test-time resize and normalisation
def test_rescale_sizes_are_mmcv_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(17, 3000, 2))
        for scale, ratios in (((2048, 512), (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)), ((2048, 1024), (1.0, 0.6)),
                              ((520, 520), (0.75, 1.33))):
            for r, s in zip(ratios, aug_scales(scale, ratios)):
                assert s == (int(scale[0] * r), int(scale[1] * r))  # MultiScaleFlipAug truncates
                nw, nh = mm_rescale_size(w, h, s)
                assert rescale_size(h, w, s) == (nh, nw)


def test_resize_is_opencv_inter_linear_not_antialiased(photo):
    h, w = photo.shape[:2]
    for ratio in (0.5, 0.75, 1.0, 1.75):  # 1.0 -> 512x795 (enlarging); 0.5 -> 256x398
        (s,) = aug_scales((2048, 512), (ratio,))
        size = rescale_size(h, w, s)
        want = cv2.resize(photo, mm_rescale_size(w, h, s), interpolation=cv2.INTER_LINEAR)
        got = resize_linear(photo, size)
        assert got.shape == want.shape == (size[0], size[1], 3) and np.array_equal(got, want)
    # shrinking: Pillow's antialiased bilinear (protocol fast) is a different image
    small = rescale_size(h, w, (300, 120))
    pil = resize_pillow(photo, small).astype(int)
    assert np.abs(pil - resize_linear(photo, small).astype(int)).max() > 20


def test_normalize_is_mmcv_imnormalize():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)  # every uint8 value
    got = normalize(img).permute(1, 2, 0).numpy()
    assert np.array_equal(got, mm_normalize(img))  # bit for bit


def test_missing_opencv_is_a_clear_error(photo, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="opencv-python-headless"):
        resize_linear(photo, (100, 155))
    assert resize_linear(photo, photo.shape[:2]) is photo  # no resize, no OpenCV needed


# ------------------------------------------------------------------ SenFormer: whole, subsets, MS + flip, slide
def test_whole_image_double_resize_and_learner_subsets(senformer, photo):
    heads = [None, (1,), (0, 2), (1, 2, 3)]
    got = infer_image(senformer, photo, heads, scale=(160, 96), protocol="official")
    views = mm_views(photo, (160, 96), [1.0], flip=False)
    assert views[0][0].shape[-2:] == (96, 149)
    errs = []
    for subset, p in zip(heads, got):
        want = OfficialEncoderDecoder(senformer, subset=subset).aug_test(views, photo.shape[:2])
        errs.append(check(p, want))
    fast = infer_image(senformer, photo, [None], scale=(160, 96), protocol="fast")[0]
    assert rel(fast.double(), got[0]) > 1e-3  # the protocols do differ


def test_multiscale_flip_averages_the_softmax_of_summed_probabilities(senformer, photo):
    ratios = (0.5, 0.75, 1.25)
    got = infer_image(senformer, photo, [None, (3,)], scale=(160, 96), ratios=ratios, flip=True)
    views = mm_views(photo, (160, 96), list(ratios), flip=True)
    assert len(views) == 6
    for subset, p in zip([None, (3,)], got):
        check(p, OfficialEncoderDecoder(senformer, subset=subset).aug_test(views, photo.shape[:2]))


@pytest.mark.parametrize("crop,stride,flip", [((128, 192), (85, 128), True),   # larger than the 96x149 input
                                              ((64, 96), (40, 60), False),      # smaller: 3x2 overlapping windows
                                              ((48, 200), (32, 100), False)])   # wider than the input only
def test_slide_inference(senformer, photo, crop, stride, flip):
    got = infer_image(senformer, photo, [None, (0, 3)], scale=(160, 96), mode="slide", crop=crop, stride=stride,
                      flip=flip)
    views = mm_views(photo, (160, 96), [1.0], flip=flip)
    for subset, p in zip([None, (0, 3)], got):
        ref = OfficialEncoderDecoder(senformer, "slide", crop, stride, subset)
        check(p, ref.aug_test(views, photo.shape[:2]))


# ------------------------------------------------------------------ single-output head: logits, then softmax
def test_upernet_resizes_logits_before_the_softmax(upernet, photo):
    got = infer_image(upernet, photo, [None], scale=(160, 96), ratios=(1.0, 0.75), flip=True)[0]
    views = mm_views(photo, (160, 96), [1.0, 0.75], flip=True)
    check(got, OfficialEncoderDecoder(upernet).aug_test(views, photo.shape[:2]))
    slid = infer_image(upernet, photo, [None], scale=(160, 96), mode="slide", crop=(128, 96), stride=(64, 64))[0]
    check(slid, OfficialEncoderDecoder(upernet, "slide", (128, 96), (64, 64)).aug_test(views[:1], photo.shape[:2]))


# ------------------------------------------------------------------ Segmentor.predict on tensors
def test_segmentor_predict_official(senformer, upernet):
    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    size = (105, 131)

    def ref_labels(net, mode="whole", crop=None, stride=None, subset=None):
        ref = OfficialEncoderDecoder(net, mode, crop, stride, subset)
        return torch.cat([ref.inference(x[i:i + 1], size, False) for i in range(len(x))]).argmax(1)

    assert torch.equal(senformer.predict(x, size=size), ref_labels(senformer))
    assert torch.equal(senformer.predict(x, size=size, learners=[2, 0]), ref_labels(senformer, subset=(0, 2)))
    for crop, stride in (((96, 128), (64, 64)), ((48, 64), (32, 40))):
        assert torch.equal(senformer.predict(x, size=size, mode="slide", crop=crop, stride=stride),
                           ref_labels(senformer, "slide", crop, stride))
    assert torch.equal(upernet.predict(x, size=size), ref_labels(upernet))


# ------------------------------------------------------------------ fast: still senformer's fused path
def test_fast_protocol_keeps_the_fused_prediction(senformer, monkeypatch):
    from senformer.models import segmentor
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    calls = []
    fused = segmentor.ops.ensemble_predict

    def spy(*args, **kwargs):
        calls.append(args[1])
        return fused(*args, **kwargs)

    monkeypatch.setattr(segmentor.ops, "ensemble_predict", spy)
    labels = senformer.predict(x, size=(99, 111), protocol="fast")
    assert calls == [(99, 111)]
    with torch.no_grad():
        want = reference.ensemble_predict(senformer.learner_logits(x), (99, 111), "mean")
    assert torch.equal(labels, want)
    senformer.predict(x, size=(99, 111))  # official: no fused op (it needs full-resolution scores)
    assert calls == [(99, 111)]
    with pytest.raises(ValueError, match="protocol"):
        senformer.predict(x, protocol="mmseg")


def test_fast_protocol_in_infer_image_is_the_mean_of_softmaxes_resized_once(senformer, photo):
    p = infer_image(senformer, photo, [None], scale=(160, 96), protocol="fast")[0]
    im = resize_pillow(photo, rescale_size(*photo.shape[:2], (160, 96)))
    with torch.no_grad():
        logits = senformer.learner_logits(normalize(im)[None].double())
    want = up(reference.merged_scores([t.float() for t in logits], "mean"), photo.shape[:2])
    torch.testing.assert_close(p, want)


# ------------------------------------------------------------------ learned merges under official
def test_learned_merge_official_scores_are_its_logits():
    torch.manual_seed(3)
    model = build_model("senformer_tiny", num_classes=5, aux=False, merge="hierarchical").double().eval()
    x = torch.randn(1, 3, 64, 72, dtype=torch.float64)
    with torch.no_grad():
        merged = model.merger(model.learner_logits(x), False)
    want = torch.softmax(up(up(merged, (64, 72)), (80, 90)), 1).argmax(1)
    assert torch.equal(model.predict(x, size=(80, 90)), want)
    img = (np.random.default_rng(1).random((40, 52, 3)) * 255).astype(np.uint8)
    ens, sub = infer_image(model, img, [None, (0, 1)], scale=(52, 40))  # a subset falls back to summed probs
    assert ens.shape == sub.shape == (1, 5, 40, 52)


# ------------------------------------------------------------------ configs and command lines
def test_protocol_is_a_config_key_and_a_cli_flag():
    from senformer.cli import eval_parser, predict_parser
    from senformer.engine.builders import eval_kwargs
    from senformer.engine.config import load_config

    for preset in ("ade20k_r50", "cityscapes_r50", "pascal_context59_r50", "coco_stuff10k_r50", None):
        cfg = load_config(preset)
        assert cfg["eval"]["protocol"] == "official" and eval_kwargs(cfg)["protocol"] == "official"
    assert eval_kwargs(load_config("ade20k_r50", ["eval.protocol=fast"]))["protocol"] == "fast"
    with pytest.raises(ValueError, match="eval.protocol"):
        load_config(None, ["eval.protocol=mmseg"])
    assert eval_parser().parse_args(["run", "--protocol", "fast"]).protocol == "fast"
    assert predict_parser().parse_args(["a.png", "-c", "run", "--protocol", "official"]).protocol == "official"
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["run", "--protocol", "mmseg"])
