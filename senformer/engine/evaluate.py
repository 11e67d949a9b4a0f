"""Dataset evaluation: mIoU of the ensemble, of each learner and of learner subsets (paper Table 1),
per-pixel prediction variance (Table 11), and class-embedding cosine similarities (Figure 4)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from ..models.protocol import check_protocol
from . import distributed as du
from .inference import infer_image, num_learners
from .metrics import ConfusionMatrix, iou_from_confusion


def _subset_name(subset):
    return "all" if subset is None else "+".join(str(i) for i in subset)


@torch.no_grad()
def evaluate(model, dataset, num_classes, ignore_index=255, scale=(512, 512), ratios=(1.0,), flip=False,
             mode="whole", crop=None, stride=None, merge=None, per_learner=False, subsets=(),
             variance=False, device="cpu", amp=False, progress=True, limit=None, protocol="official"):
    """Returns {"ensemble": metrics, "learners": [metrics per learner] (per_learner), "subsets":
    {"0+2": metrics} (learner index tuples), "variance": {"ensemble": v, "learner_0": v, ...}}.
    Metrics are those of ``metrics.iou_from_confusion``. In a DDP run every process takes a shard of
    the images and the confusion matrices are summed. ``protocol``: "official" (mmseg 0.20's test
    arithmetic, the paper's) or "fast" (see ``inference.infer_image``); the variance is that of the
    protocol's probabilities."""
    check_protocol(protocol)
    was_training = model.training
    model.eval()
    m = num_learners(model)
    for s in subsets:
        bad = [i for i in s if not 0 <= i < m]
        if bad or not s:
            raise ValueError(f"learner subset {tuple(s)} is not a non-empty subset of learners 0..{m - 1}")
    heads = [None]
    if per_learner or variance:
        heads += [(i,) for i in range(m)]
    heads += [tuple(s) for s in subsets]
    cms = [ConfusionMatrix(num_classes, ignore_index) for _ in heads]
    var_sum = torch.zeros(len(heads), dtype=torch.float64)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(du.rank(), n, du.world_size())
    bar = tqdm(indices, desc="eval", disable=not (progress and du.is_main()), dynamic_ncols=True)
    for i in bar:
        sample = dataset[i]
        probs = infer_image(model, sample["img"], heads, scale, ratios, flip, mode, crop, stride, merge, device,
                            amp=amp, protocol=protocol)
        target = sample["seg"]
        for cm, p in zip(cms, probs):
            cm.update(p.argmax(1)[0].cpu(), target)
        if variance:
            var_sum += torch.tensor([p.var(dim=1, unbiased=False).mean().item() for p in probs], dtype=torch.float64)
    mats = torch.stack([cm.mat for cm in cms])
    if du.is_dist():
        mats = du.all_reduce_sum(mats.to(device)).cpu()
        var_sum = du.all_reduce_sum(var_sum.to(device)).cpu()
    model.train(was_training)
    out = {"ensemble": iou_from_confusion(mats[0])}
    k = 1
    if per_learner or variance:
        if per_learner:
            out["learners"] = [iou_from_confusion(mats[1 + i]) for i in range(m)]
        k += m
    if subsets:
        out["subsets"] = {_subset_name(s): iou_from_confusion(mats[k + j]) for j, s in enumerate(subsets)}
    if variance:
        v = (var_sum / max(n, 1)).tolist()
        out["variance"] = {"ensemble": v[0], **{f"learner_{i}": v[1 + i] for i in range(m)}}
    return out


def class_embedding_similarity(model, bins=50):
    """Per learner: the cosine similarities cos(cls_k, cls_l), k < l, and their histogram on [-1, 1]."""
    head = getattr(model, "head", None)
    learners = getattr(head, "learners", None)
    if learners is None:
        raise ValueError("the model has no head.learners: class embeddings are not available")
    out = []
    for i, learner in enumerate(learners):
        emb = getattr(learner, "cls_emb", None)
        if emb is None:
            raise ValueError(f"head.learners[{i}] has no cls_emb parameter")
        e = emb.detach().float().reshape(-1, emb.shape[-1])
        e = e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)
        sim = e @ e.t()
        k, l = torch.triu_indices(len(e), len(e), offset=1)
        vals = sim[k, l].cpu()
        hist = torch.histc(vals, bins=bins, min=-1.0, max=1.0)
        density = hist / (hist.sum().clamp(min=1) * (2.0 / bins))
        out.append({"values": vals, "density": density.tolist(), "mean": vals.mean().item() if len(vals) else math.nan})
    return out


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def save_similarity_plot(stats, path, bins=50):
    """Figure-4-style PNG: one density curve per learner over cosine similarity [-1, 1]."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    centers = [-1 + (j + 0.5) * 2 / bins for j in range(bins)]
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, s in enumerate(stats):
            ax.plot(centers, s["density"], label=f"learner {i}")
        ax.set_xlabel("cosine similarity between class embeddings")
        ax.set_ylabel("density")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    from PIL import Image, ImageDraw
    w, h, ml, mb, mt, mr = 640, 420, 60, 50, 20, 20
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    top = max(max(s["density"]) for s in stats) or 1.0
    px = lambda x: ml + (x + 1) / 2 * (w - ml - mr)  # noqa: E731
    py = lambda y: h - mb - y / top * (h - mb - mt)  # noqa: E731
    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for t in (-1, -0.5, 0, 0.5, 1):
        d.line([px(t), h - mb, px(t), h - mb + 5], fill="black")
        d.text((px(t) - 10, h - mb + 8), f"{t:g}", fill="black")
    d.text((ml, h - 18), "cosine similarity between class embeddings", fill="black")
    d.text((5, mt), f"{top:.2f}", fill="black")
    d.text((5, h - mb - 10), "0", fill="black")
    for i, s in enumerate(stats):
        c = _COLOURS[i % len(_COLOURS)]
        d.line([(px(x), py(y)) for x, y in zip(centers, s["density"])], fill=c, width=2)
        d.text((w - mr - 90, mt + 5 + 14 * i), f"learner {i}", fill=c)
    im.save(path)
    return path


def evaluate_checkpoint(model, cfg, classes, device, eval_kw, split=None, per_learner=False, subsets=None,
                        all_subsets=False, variance=False, similarity_plot=None, limit=None, progress=True):
    """What ``senformer-eval`` computes for a loaded model: (results of ``evaluate`` plus, with
    ``similarity_plot`` (a PNG path), the class-embedding cosine means; number of images evaluated)."""
    from itertools import combinations

    from ..errors import ConfigError
    from .builders import build_val_dataset

    ds = build_val_dataset(cfg, split)
    if len(ds.CLASSES) != len(classes):
        raise ConfigError(f"dataset {cfg['data']['dataset']} has {len(ds.CLASSES)} classes but the checkpoint "
                          f"was trained for {len(classes)}")
    m = num_learners(model)
    subsets = list(subsets or [])
    if all_subsets:
        subsets += [c for r in range(1, m + 1) for c in combinations(range(m), r)]
    res = evaluate(model, ds, len(classes), device=device, per_learner=per_learner, subsets=subsets,
                   variance=variance, progress=progress, limit=limit,
                   amp=bool(cfg.get("amp")) and device.type == "cuda", **eval_kw)
    if similarity_plot:
        stats = class_embedding_similarity(model)
        save_similarity_plot(stats, similarity_plot)
        res["cls_emb_cosine_mean"] = [s["mean"] for s in stats]
    return res, len(ds) if limit is None else min(limit, len(ds))
