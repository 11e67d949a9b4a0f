"""Load a trained model in one call and segment images with it; save and share it in the Hugging Face
layout.

    model = senformer.load("work_dirs/shapes_tiny")   # or a checkpoint, a save_pretrained folder, a .pth
    labels = model.segment("photo.jpg")               # (H, W) int64 class ids at the photo's size

``load`` accepts everything the CLIs accept (``engine.loading``) plus a Hub repo id; the returned
:class:`Segmenter` carries the class names, the palette and the run's test settings, so that
``segment`` applies the model's own evaluation protocol (official mmseg 0.20 arithmetic by default)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.classes import palette_for
from ..data.io import read_image
from ..errors import UserError
from ..models.module_state import eval_mode, module_device
from .builders import eval_kwargs
from .checkpoint import WEIGHTS, model_state
from .device import pick_device
from .inference import infer_image
from .config import load_config
from .loading import inference_config, load_model, model_section

CONFIG_JSON = "config.json"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class Segmenter(torch.nn.Module):
    """A trained segmentation model with its class names, palette and test settings.

    Calls and unknown attributes go to the wrapped model (``learner_logits``, ``predict``, ...), so it
    stands in for it; ``segment`` is the image-level entry point."""

    def __init__(self, model: torch.nn.Module, classes, palette=None, config: dict = None):
        """``config``: the run config (test settings, and what rebuilds the model on load); None for a
        model of the zoo gives the defaults with the model's preset and build arguments."""
        super().__init__()
        if config is None:
            if not hasattr(model, "preset"):
                raise ValueError("Segmenter: config is needed for a model outside the zoo (senformer.build_model)")
            config = load_config(None, [("model", model_section(model))])
        self.model = model
        self.classes = [str(c) for c in classes]
        if len(self.classes) != model.num_classes:
            raise ValueError(f"{len(self.classes)} class names for a model of {model.num_classes} classes")
        self.palette = np.asarray(palette_for(self.classes) if palette is None else palette, np.uint8)
        self.config = config
        self.test_settings = {k: v for k, v in eval_kwargs(config).items() if k != "ignore_index"}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(super().__getattr__("model"), name)

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @torch.no_grad()
    def segment(self, images, return_probs: bool = False, *, learners=None, progress: bool = False, **settings):
        """Label maps of ``images``: a path, a PIL image, an HxWx3 uint8 array (HxW and HxWx4 are taken as
        grey and RGBA) or a list of them. Each result is an (H, W) int64 array at the input's size; with
        ``return_probs`` a pair (labels, probabilities (N, H, W) float32). ``settings`` override the run's
        test settings: ``mode`` (whole|slide), ``ratios`` (test scales), ``flip``, ``scale``, ``crop``,
        ``stride``, ``merge``, ``protocol`` (official|fast); ``learners`` scores a subset of learners."""
        unknown = sorted(set(settings) - set(self.test_settings))
        if unknown:
            raise TypeError(f"segment: unknown setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(self.test_settings))}, learners, progress")
        kw = {**self.test_settings, **settings}
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        head = None if learners is None else tuple(int(i) for i in learners)
        out = []
        with eval_mode(self.model):
            for item in _progress(items, progress and not single):
                img = as_rgb(item)
                probs = infer_image(self.model, img, [head], device=self.device, **kw)[0][0]
                labels = probs.argmax(0).cpu().numpy().astype(np.int64)
                out.append((labels, probs.float().cpu().numpy()) if return_probs else labels)
        return out[0] if single else out

    # -- the Hugging Face layout ----------------------------------------------------------------
    def save_pretrained(self, save_directory) -> Path:
        """``config.json`` (classes, palette, the run config) + ``model.safetensors`` (the weights, the same
        config in its header, so the file also loads alone). ``senformer.load(dir)`` reads it back."""
        from safetensors.torch import save_file

        from .. import __version__

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = inference_config(self.config)
        cfg["data"]["root"] = None  # a local path means nothing on another machine
        palette = self.palette.tolist()
        info = {"model_type": "senformer", "senformer_version": __version__, "preset": cfg["model"]["preset"],
                "num_classes": self.num_classes, "classes": self.classes, "palette": palette, "config": cfg}
        header = {"config": json.dumps(cfg), "classes": json.dumps(self.classes), "palette": json.dumps(palette)}
        # write beside, then rename: an interrupted save never leaves a half file under the real name
        tmp = d / f".{WEIGHTS}.tmp-{os.getpid()}"
        save_file(model_state(self.model), str(tmp), metadata=header)
        os.replace(tmp, d / WEIGHTS)
        tmp = d / f".{CONFIG_JSON}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, d / CONFIG_JSON)
        return d

    def push_to_hub(self, repo_id: str, *, private=None, token=None, commit_message="Upload senformer model",
                    **upload_kwargs):
        """``save_pretrained`` into a temporary folder and upload it to the Hub repo ``repo_id`` (created if
        needed) with ``huggingface_hub``; returns its commit info."""
        api = _hub().HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                     **upload_kwargs)


def as_rgb(image) -> np.ndarray:
    """HxWx3 uint8 RGB from a path, a PIL image or an array (grey HxW / HxWx1 and RGBA HxWx4 converted)."""
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image} not found")
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(f"segment: an image array must be uint8 (0..255), got {image.dtype}; "
                            f"e.g. (img * 255).round().astype(np.uint8) for floats in [0, 1]")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim == 3 and image.shape[2] in (1, 3, 4) and min(image.shape[:2]) > 0:
            return np.ascontiguousarray(np.repeat(image, 3, 2) if image.shape[2] == 1 else image[:, :, :3])
        raise UserError(f"segment: an image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
    raise UserError(f"segment: expected a path, a PIL image or an HxWx3 uint8 numpy array, got "
                    f"{type(image).__name__}" + (" (a batch tensor goes to model.predict)"
                                                 if isinstance(image, torch.Tensor) else ""))


def _progress(items, show):
    if not show:
        return items
    from tqdm import tqdm
    return tqdm(items, desc="segment", unit="img")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("the Hugging Face Hub needs the huggingface_hub package: pip install huggingface_hub") \
            from None
    return huggingface_hub


def load(path, device="auto", *, config=None, overrides=(), **hub_kwargs) -> Segmenter:
    """The model of ``path`` in eval mode on ``device`` ("auto": CUDA when available), as a
    :class:`Segmenter`. ``path``: a run's work dir (its latest checkpoint), a checkpoint folder, a
    ``save_pretrained`` folder, a ``model.safetensors`` written by senformer (training or convert), an
    official SenFormer / mmseg UperNet ``.pth``, or a Hub repo id ``user/name`` (``from_pretrained``).
    ``config`` / ``overrides`` replace or amend the saved run config (e.g. ``[("eval.mode", "slide")]``)."""
    p = Path(path)
    if not p.exists():
        if _REPO_ID.match(str(path)) and not str(path).startswith("."):
            return from_pretrained(str(path), device=device, config=config, overrides=overrides, **hub_kwargs)
        raise FileNotFoundError(f"{path} does not exist (expected a work dir, checkpoint, save_pretrained folder, "
                                f".safetensors or .pth file, or a Hub repo id user/name)")
    if hub_kwargs:
        raise TypeError(f"load: {', '.join(sorted(hub_kwargs))} only apply to a Hub repo id")
    cfg, classes, palette, model = load_model(p, config, overrides)
    return Segmenter(model, classes, palette, cfg).to(pick_device(device)).eval()


def from_pretrained(repo_id: str, device="auto", *, revision=None, cache_dir=None, local_files_only=None,
                    token=None, config=None, overrides=()) -> Segmenter:
    """A ``save_pretrained`` folder from the Hugging Face Hub (downloaded once into its cache; with
    ``local_files_only`` or ``HF_HUB_OFFLINE=1`` only the cache is read)."""
    hub = _hub()
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    folder = hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                   allow_patterns=[CONFIG_JSON, WEIGHTS], **kwargs)
    return load(folder, device, config=config, overrides=overrides)
