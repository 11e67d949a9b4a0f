"""The training loop: AdamW + poly/warmup, grad clipping, bf16 autocast on GPU, DDP via torchrun,
atomic resumable checkpoints, SIGINT/SIGTERM stop with a checkpoint, tqdm progress, a log file and
CSV scalars, evaluation at the end.

``Trainer`` is built in one order that matters: datasets are built and checked before the model,
the model before the work dir is created (a wrong data root or weights file leaves nothing behind),
and on resume the RNG state is restored only after the DataLoader iterator exists, because creating
the iterator draws a random number."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CheckpointError, DataError
from . import distributed as du
from .builders import build_model_from_cfg, build_train_dataset, build_val_dataset, eval_kwargs
from .checkpoint import latest_checkpoint, load_state, load_weights, rng_state, save_checkpoint, set_rng_state
from .config import dump_config, validate
from .device import pick_device, seed_everything
from .evaluate import evaluate
from .interrupt import StopSignals, worker_ignores_stop_signals
from .optim import PolyWarmup, build_optimizer
from .resume import config_changes
from .sampler import ResumableSampler
from .scalars import ScalarWriter
from .sync_bn import convert_cpu_sync_batchnorm


class _LossModule(torch.nn.Module):
    """DDP hooks its gradient all-reduce on ``forward``; the Segmentor's entry point is ``loss``."""

    def __init__(self, model, ignore_index):
        super().__init__()
        self.model, self.ignore_index = model, ignore_index

    def forward(self, images, target):
        return self.model.loss(images, target, ignore_index=self.ignore_index)


def _logger(work_dir: Path, main: bool) -> logging.Logger:
    log = logging.getLogger(f"senformer.train.{work_dir}")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if main else logging.WARNING)
    if main:
        fh = logging.FileHandler(work_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    return log


def _worker_init(_):
    torch.set_num_threads(1)
    worker_ignores_stop_signals()


def _stop_workers(it):
    """Shut the DataLoader workers down now rather than at interpreter exit: they ignore SIGTERM (see
    ``worker_ignores_stop_signals``), which is what torch and multiprocessing would otherwise use."""
    workers = list(getattr(it, "_workers", ()))
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
        w.join(timeout=5)


def _next_batch(it):
    try:
        return next(it)
    except DataError as e:  # re-raised from a worker with its traceback in the message: keep the last line
        raise DataError(str(e).strip().splitlines()[-1].split(": ", 1)[-1]) from None


class Trainer:
    """One training run per ``cfg`` (see ``config.RunConfig``)."""

    def __init__(self, cfg: dict, work_dir=None, progress=True, print_fn=print, check_data=False):
        self.cfg = cfg = validate(cfg)
        self.progress, self.print_fn = progress, print_fn
        self.device = pick_device(cfg["device"])
        du.init_distributed(self.device.type)
        self.rank, self.world, self.main = du.rank(), du.world_size(), du.is_main()
        self.work_dir = Path(work_dir or Path("work_dirs") / cfg["name"])
        self.ckpt_dir = self.work_dir / "checkpoints"
        seed_everything(cfg["seed"])
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._build_data(check_data)
        self._build_model()
        if self.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        du.barrier()
        self.log = _logger(self.work_dir, self.main)
        self.step, self.losses, self.pending, self.keys = 0, [], [], None

    # ------------------------------------------------------------ build
    def _build_data(self, check_data):
        self.train_set, self.val_set = build_train_dataset(self.cfg), build_val_dataset(self.cfg)
        show = self.progress and self.main
        checked = {split: ds.validate(full=check_data, progress=show)
                   for split, ds in (("train", self.train_set), ("val", self.val_set))}
        self.data_checked = "; ".join(f"{k} {v['pairs']} pairs' sizes, {v['labels_decoded']} label maps"
                                      for k, v in checked.items() if v)

    def _build_model(self):
        cfg, o, s = self.cfg, self.cfg["optim"], self.cfg["schedule"]
        model = build_model_from_cfg(cfg, self.train_set.num_classes).to(self.device)
        if self.world > 1 and cfg["ddp"]["sync_bn"]:
            # torch's SyncBatchNorm runs on GPUs only; CPU (gloo) runs get an all-reduce based equivalent
            model = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.device.type == "cuda"
                     else convert_cpu_sync_batchnorm(model))
        self.model = model
        self.optimizer = build_optimizer(model, o["lr"], o["weight_decay"], o["backbone_lr_mult"], o["betas"])
        self.sched = PolyWarmup(self.optimizer, o["lr"], s["iters"], s["power"], s["min_lr"], s["warmup_iters"],
                                s["warmup_ratio"])
        self.amp = cfg["amp"] and self.device.type == "cuda"
        net = _LossModule(model, cfg["data"]["ignore_index"])
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg["ddp"]["find_unused_parameters"])
        self.net = net

    def _loader(self):
        d = self.cfg["data"]
        sampler = ResumableSampler(len(self.train_set), d["batch_size"], self.cfg["seed"], self.rank, self.world,
                                   start_step=self.step)
        nw = d["num_workers"]
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=sampler.local_batch, sampler=sampler, num_workers=nw,
            pin_memory=self.device.type == "cuda", persistent_workers=nw > 0, drop_last=True,
            worker_init_fn=_worker_init if nw > 0 else None)

    def _load(self, resume):
        """Weights, optimizer and schedule of the checkpoint; returns its per-rank RNG state."""
        ckpt = latest_checkpoint(self.ckpt_dir) if resume is True else Path(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in {self.ckpt_dir}")
        st = load_state(ckpt)
        load_weights(self.model, ckpt)
        try:
            self.optimizer.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            self.step, rng = int(st["step"]), st["rng"]
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt} cannot resume this run: its training state does not fit "
                                  f"({type(e).__name__}: {e})") from e
        for change in config_changes(validate(json.loads(st["config"])), self.cfg) if "config" in st else ():
            self.log.info(f"resume changes {change}")
        self.log.info(f"resumed from {ckpt} at step {self.step}")
        return rng[self.rank] if self.rank < len(rng) else rng[0]

    # ------------------------------------------------------------ loop pieces
    def train_step(self, batch) -> dict:
        x = batch["img"].to(self.device, non_blocking=True)
        y = batch["seg"].to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.net(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        clip = self.cfg["optim"]["grad_clip"]
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip) if clip else None
        self.optimizer.step()
        self.sched.step()
        self.step += 1
        self.keys = self.keys or ["loss"] + [k for k in out if k != "loss" and torch.is_tensor(out[k])
                                             and out[k].numel() == 1]
        self.pending.append([out[k].detach().float() for k in self.keys]
                            + ([gnorm.detach().float()] if gnorm is not None else []))
        return out

    def log_scalars(self, images_per_s):
        """All-reduce the pending per-step scalars; write the last step's to the log, CSV and bar."""
        if not self.pending:
            return
        vals = du.all_reduce_mean(torch.stack([torch.stack(v) for v in self.pending]).float().to(self.device)).cpu()
        self.losses += [row[0] for row in vals.tolist()]
        self.pending.clear()
        last, lr = vals[-1].tolist(), self.sched.get_last_lr()[-1]
        if not all(math.isfinite(v) for v in last):
            raise FloatingPointError(f"step {self.step}: non-finite loss {dict(zip(self.keys, last))}")
        for k, v in zip(self.keys + ["grad_norm"], last):
            self.writer.add(self.step, f"train/{k}", v)
        self.writer.add(self.step, "train/lr", lr)
        self.writer.add(self.step, "train/img_per_s", images_per_s)
        self.writer.flush()
        self.bar.set_postfix(loss=f"{last[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        self.log.info(f"step {self.step}/{self.cfg['schedule']['iters']} "
                      + " ".join(f"{k}={v:.4f}" for k, v in zip(self.keys, last))
                      + f" lr={lr:.3e} img/s={images_per_s:.1f}")

    def save(self) -> Path:
        states = [rng_state()]
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, rng_state())
        path = self.ckpt_dir / f"iter_{self.step:07d}"
        if self.main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.sched.state_dict(),
                     "step": self.step, "rng": states, "config": json.dumps(self.cfg),
                     "classes": list(self.train_set.CLASSES)}
            path = save_checkpoint(self.ckpt_dir, self.step, self.model, state, self.cfg["checkpoint"]["keep_last"])
        du.barrier()
        return path

    def evaluate(self, progress=False) -> dict:
        m = evaluate(self.model, self.val_set, self.train_set.num_classes, device=self.device, amp=self.amp,
                     progress=progress, **eval_kwargs(self.cfg))["ensemble"]
        self.writer.add(self.step, "val/mIoU", m["mIoU"])
        self.log.info(f"step {self.step} val mIoU={m['mIoU'] * 100:.2f} aAcc={m['aAcc'] * 100:.2f}")
        self.model.train()
        return m

    def _stop_requested(self, stop: StopSignals) -> int:
        signum = torch.tensor([stop.signum or 0])
        if self.world > 1:  # every rank must stop at the same step (NCCL reduces CUDA tensors only)
            signum = signum.to(self.device)
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        return int(signum)

    def _loop(self, it, end, total, stop: StopSignals) -> int:
        """Steps until ``end`` or a stop signal (returned, else 0), logging, checkpointing and evaluating."""
        cfg = self.cfg
        log_every, ck_every, ev_every = cfg["log"]["interval"], cfg["checkpoint"]["interval"], cfg["eval"]["interval"]
        self.bar = tqdm(total=total, initial=self.step, desc="train", disable=not (self.progress and self.main),
                        dynamic_ncols=True)
        t_last, n_img, signum = time.time(), 0, 0

        def log():
            nonlocal t_last, n_img
            self.log_scalars(n_img / max(time.time() - t_last, 1e-9))
            t_last, n_img = time.time(), 0

        while self.step < end:
            self.train_step(_next_batch(it))
            n_img += cfg["data"]["batch_size"]
            if self.step % log_every == 0 or self.step == end:
                log()
            self.bar.update(1)
            signum = self._stop_requested(stop)
            if signum:
                break
            if ck_every and self.step % ck_every == 0 and self.step != end:
                self.save()
            if ev_every and self.step % ev_every == 0 and self.step != total:
                self.evaluate()
        self.bar.close()
        log()  # an interrupted run's last steps
        return signum

    # ------------------------------------------------------------ the run
    def fit(self, resume=None, stop_after=None) -> dict:
        """Train to ``schedule.iters`` (or ``stop_after``) from scratch or from ``resume`` (True: the
        work dir's latest checkpoint, or a checkpoint path). Returns {"losses", "metrics", "step",
        "work_dir", "model", "interrupted" (signal number or None), "checkpoint"}."""
        cfg, total = self.cfg, self.cfg["schedule"]["iters"]
        rng = self._load(resume) if resume else None
        if self.main:
            dump_config(cfg, self.work_dir / "config.yaml")
        it = iter(self._loader())
        if rng is not None:
            set_rng_state(rng)
        self.writer = ScalarWriter(self.work_dir, self.main, resume_step=self.step if resume else None,
                                   note=self._note)
        end = total if stop_after is None else min(total, int(stop_after))
        self.log.info(f"training {cfg['name']}: {total} iterations, global batch {cfg['data']['batch_size']} on "
                      f"{self.world} process(es), device {self.device}, amp={self.amp}, "
                      f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.3g}M params"
                      + (f"; data checked: {self.data_checked}" if self.data_checked else ""))
        self.model.train()
        with StopSignals() as stop:  # until the checkpoint is written: a second signal exits at once
            try:
                signum = self._loop(it, end, total, stop)
            finally:
                _stop_workers(it)
            saved = self.save()
        metrics = None
        if signum:
            self.log.info(f"interrupted by signal {signum} at step {self.step}; checkpoint {saved}")
        elif self.step >= total:
            metrics = self.evaluate(progress=self.progress)
            msg = (f"final {cfg['name']} step {self.step}: mIoU={metrics['mIoU'] * 100:.2f} "
                   f"aAcc={metrics['aAcc'] * 100:.2f} on {len(self.val_set)} {cfg['data']['val_split']} images")
            self.log.info(msg)
            if self.main:
                self.print_fn(msg)
                (self.work_dir / "metrics.json").write_text(json.dumps({"step": self.step, **metrics}, indent=1))
        return {"losses": self.losses, "metrics": metrics, "step": self.step, "work_dir": str(self.work_dir),
                "model": self.model, "interrupted": signum or None, "checkpoint": saved}

    def _note(self, msg, level=logging.INFO):
        """One line to train.log and to the user."""
        self.log.log(level, msg)
        self.print_fn(msg)

    def _write_curves(self):
        """<work_dir>/curves.png from scalars.csv: a convenience, so a failure is a warning, never an error."""
        try:
            from .curves import plot_scalars
            if plot_scalars(self.work_dir / "scalars.csv", self.work_dir / "curves.png"):
                self.log.info(f"training curves: {self.work_dir / 'curves.png'}")
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            self._note(f"warning: curves.png not written: {type(e).__name__}: {first}", logging.WARNING)

    def close(self):
        """Also runs after a failed or interrupted ``fit`` (``train`` calls it in a finally)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()  # flushes the final val/mIoU row before it is plotted
            if self.main:
                self._write_curves()
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


def train(cfg: dict, work_dir=None, resume=None, stop_after=None, progress=True, print_fn=print,
          check_data=False) -> dict:
    """Train per ``cfg`` (see ``config.RunConfig``). ``resume``: True (latest checkpoint in the work dir),
    a checkpoint path, or None. ``stop_after``: stop with a checkpoint after that step (preemptible runs).
    ``check_data``: decode every label map before training (default: a sample; sizes always).
    Returns {"losses": per-step mean loss, "metrics": final evaluation or None, "step", "work_dir",
    "model", "interrupted": the signal that stopped the run or None, "checkpoint": the last one written}."""
    trainer = Trainer(cfg, work_dir, progress=progress, print_fn=print_fn, check_data=check_data)
    try:
        return trainer.fit(resume, stop_after)
    finally:
        trainer.close()
