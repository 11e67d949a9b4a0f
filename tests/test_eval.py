import json

import numpy as np
import pytest
import torch

from senformer.cli import eval_main
from senformer.data import ShapesDataset, TestPipeline
from senformer.data.transforms import normalize
from senformer.engine.evaluate import class_embedding_similarity, evaluate, save_similarity_plot
from senformer.engine.inference import head_probs, infer_image, slide_probs
from senformer.engine.metrics import mean_iou
from senformer.engine.toy import ToySegmentor
from senformer.ops import reference


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ToySegmentor(5, num_learners=3).eval()


@pytest.fixture(scope="module")
def data():
    return ShapesDataset("val", length=3, size=(37, 45), pipeline=TestPipeline((45, 37)))


def test_whole_image_metrics_match_direct_computation(model, data):
    res = evaluate(model, data, 5, scale=(45, 37), progress=False, per_learner=True, subsets=[(0, 2), (0, 1, 2)])
    preds, preds0, preds02 = [], [], []
    for i in range(len(data)):
        x = normalize(data[i]["img"]).unsqueeze(0)
        logits = model.learner_logits(x)
        preds.append(reference.ensemble_predict(logits, (37, 45))[0])
        preds0.append(reference.ensemble_predict(logits[:1], (37, 45))[0])
        preds02.append(reference.ensemble_predict([logits[0], logits[2]], (37, 45))[0])
    targets = [data[i]["seg"] for i in range(len(data))]
    assert res["ensemble"]["IoU"] == pytest.approx(mean_iou(preds, targets, 5)["IoU"], nan_ok=True)
    assert res["learners"][0]["IoU"] == pytest.approx(mean_iou(preds0, targets, 5)["IoU"], nan_ok=True)
    assert res["subsets"]["0+2"]["IoU"] == pytest.approx(mean_iou(preds02, targets, 5)["IoU"], nan_ok=True)
    assert res["subsets"]["0+1+2"] == res["ensemble"]
    with pytest.raises(ValueError, match="subset"):
        evaluate(model, data, 5, subsets=[(0, 3)], progress=False)


def test_slide_window_covering_the_image_equals_whole(model):
    x = torch.randn(1, 3, 29, 35)
    whole = [torch.nn.functional.interpolate(p, size=(29, 35), mode="bilinear") for p in head_probs(model, x, [None, (1,)])]
    slid = slide_probs(model, x, [None, (1,)], crop=(29, 35), stride=(20, 20))
    for a, b in zip(whole, slid):
        torch.testing.assert_close(a, b)
    # ragged: windows overlap and the last ones are clamped to the border; probabilities stay normalised
    rag = slide_probs(model, x, [None], crop=(16, 24), stride=(9, 13))[0]
    assert rag.shape == (1, 5, 29, 35)
    torch.testing.assert_close(rag.sum(1), torch.ones(1, 29, 35))
    small = slide_probs(model, x, [None], crop=(40, 48), stride=(30, 30))[0]  # window larger than image
    assert small.shape == (1, 5, 29, 35)


def test_flip_and_multiscale_average(model, data):
    img = data[0]["img"]
    base = infer_image(model, img, [None], scale=(45, 37))[0]
    flipped = infer_image(model, img[:, ::-1].copy(), [None], scale=(45, 37))[0].flip(-1)
    both = infer_image(model, img, [None], scale=(45, 37), flip=True)[0]
    torch.testing.assert_close(both, (base + flipped) / 2)
    ms = infer_image(model, img, [None], scale=(45, 37), ratios=(0.5, 1.0, 1.75), flip=True)[0]
    assert ms.shape == (1, 5, 37, 45) and not torch.allclose(ms, both)
    torch.testing.assert_close(ms.sum(1), torch.ones(1, 37, 45))


def test_variance_is_the_channel_variance_of_each_prediction(model, data):
    res = evaluate(model, data, 5, scale=(45, 37), variance=True, progress=False)
    manual = []
    for i in range(len(data)):
        p = infer_image(model, data[i]["img"], [None, (0,), (1,), (2,)], scale=(45, 37))
        manual.append([q.var(dim=1, unbiased=False).mean().item() for q in p])
    manual = np.mean(manual, axis=0)
    got = [res["variance"][k] for k in ("ensemble", "learner_0", "learner_1", "learner_2")]
    np.testing.assert_allclose(got, manual, rtol=1e-6)


def test_class_embedding_similarity_histogram(model, tmp_path):
    stats = class_embedding_similarity(model)
    assert len(stats) == 3 and len(stats[0]["values"]) == 10
    e = torch.nn.functional.normalize(model.head.learners[1].cls_emb.detach(), dim=1)
    np.testing.assert_allclose(sorted(stats[1]["values"].tolist()),
                               sorted((e @ e.t())[torch.triu_indices(5, 5, 1).unbind()].tolist()), atol=1e-6)
    assert sum(stats[0]["density"]) * 2 / 50 == pytest.approx(1.0)
    png = save_similarity_plot(stats, tmp_path / "sim.png")
    from PIL import Image
    assert Image.open(png).size[0] > 100


def test_similarity_plot_without_matplotlib(model, tmp_path, monkeypatch):
    import sys
    from PIL import Image
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError: Pillow drawing
    png = save_similarity_plot(class_embedding_similarity(model), tmp_path / "sim.png")
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape == (420, 640, 3) and (im == [31, 119, 180]).all(-1).any()  # learner 0's curve is drawn


def test_eval_cli_on_a_trained_run(tmp_path, capsys):
    from senformer.cli import train_main
    wd = tmp_path / "run"
    train_main(["--model", "toy", "--iters", "2", "--work-dir", str(wd), "--num-workers", "0", "--no-progress",
                "--set", "data.val_options.length=2", "--set", "data.crop_size=[32,32]", "--device", "cpu"])
    out = tmp_path / "res.json"
    eval_main([str(wd), "--per-learner", "--all-subsets", "--variance", "--similarity-plot", str(tmp_path / "s.png"),
               "--mode", "slide", "--crop-size", "64", "--stride", "48", "--ms", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "ensemble: mIoU" in text and "learner 1: mIoU" in text and "variance ensemble" in text
    res = json.loads(out.read_text())
    assert set(res["subsets"]) == {"0", "1", "0+1"} and res["classes"][0] == "background"
    assert (tmp_path / "s.png").is_file()
    with pytest.raises(SystemExit):
        eval_main([str(wd), "--set", "model.kwargs={num_learners: 3}", "--no-progress"])
    assert "missing from the checkpoint: head.learners.2" in capsys.readouterr().err
