"""Two gloo processes (as torchrun would start them) against one process with the same global batch."""
import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from senformer.engine.config import load_config
from senformer.engine.trainer import train


def _cfg(norm="gn", sync_bn=True):
    # ratio_range >= 1 keeps every crop free of padding, so both ranks average over the same number
    # of labelled pixels and the mean of the two ranks' gradients equals the full-batch gradient
    return load_config(None, [
        ("model.preset", "toy"), ("model.kwargs", {"norm": norm}), ("data.options", {"size": [40, 40]}),
        ("data.scale", [40, 40]), ("data.ratio_range", [1.0, 1.5]), ("data.crop_size", [32, 32]),
        ("data.batch_size", 4), ("data.num_workers", 0), ("data.val_options", {"length": 4}),
        ("schedule.iters", 5), ("schedule.warmup_iters", 1), ("checkpoint.interval", 0), ("log.interval", 1),
        ("optim.lr", 3e-3), ("device", "cpu"), ("ddp.sync_bn", sync_bn)])


def _worker(rank, world, port, cfg, work_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from senformer.engine import distributed as du
    try:
        res = train(cfg, work_dir, progress=False, print_fn=lambda *_: None)
        if rank == 0:
            params = {k: v.tolist() for k, v in res["model"].state_dict().items()}
            with open(out, "w") as f:
                json.dump({"losses": res["losses"], "params": params, "mIoU": res["metrics"]["mIoU"]}, f)
    finally:
        du.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(cfg, tmp_path, tag):
    out = tmp_path / f"{tag}.json"
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(tmp_path / tag), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return json.loads(out.read_text())


def _param_rel_err(single_model, ddp):
    num, den = 0.0, 0.0
    for k, v in single_model.state_dict().items():
        d = torch.tensor(ddp["params"][k], dtype=v.dtype)
        num += float((d - v).double().norm() ** 2)
        den += float(v.double().norm() ** 2)
    return (num / den) ** 0.5


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_two_gloo_processes_match_one_process(tmp_path, norm):
    """GroupNorm: plain DDP. BatchNorm: DDP with the CPU SyncBatchNorm, whose global statistics make
    two half batches behave as one full batch, running statistics included."""
    single = train(_cfg(norm), tmp_path / "one", progress=False, print_fn=lambda *_: None)
    ddp = _two_processes(_cfg(norm), tmp_path, "two")
    assert len(ddp["losses"]) == len(single["losses"]) == 5
    for a, b in zip(single["losses"], ddp["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert _param_rel_err(single["model"], ddp) < 1e-5
    assert abs(ddp["mIoU"] - single["metrics"]["mIoU"]) < 1e-6
    # the parameters did move: the comparison is not between two untouched initialisations
    init = train(_cfg(norm), tmp_path / "zero", stop_after=0, progress=False)["model"]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(init.state_dict().values(),
                                                            single["model"].state_dict().values()))
    assert moved > 0
    if norm == "bn":
        # and the check can fail: per-process BatchNorm statistics do not give the full-batch result
        unsynced = _two_processes(_cfg(norm, sync_bn=False), tmp_path, "unsynced")
        assert max(abs(a - b) / abs(a) for a, b in zip(single["losses"], unsynced["losses"])) > 1e-4


def _stopping_worker(rank, world, port, cfg, work_dir, out):
    """Rank 1 alone receives SIGTERM during step 2 (a scheduler may signal one node first)."""
    import signal

    from senformer.engine import trainer
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    step = trainer.Trainer.train_step

    def train_step(self, batch):
        res = step(self, batch)
        if self.rank == 1 and self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    trainer.Trainer.train_step = train_step
    from senformer.engine import distributed as du
    try:
        res = trainer.train(cfg, work_dir, progress=False)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"step": res["step"], "interrupted": res["interrupted"]}, f)
    finally:
        du.cleanup()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    from senformer.engine.checkpoint import latest_checkpoint, load_state
    out = tmp_path / "stop"
    mp.start_processes(_stopping_worker, args=(2, _free_port(), _cfg(), str(tmp_path / "run"), str(out)), nprocs=2,
                       join=True, start_method="spawn")
    results = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    assert results == [{"step": 2, "interrupted": 15}] * 2
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "iter_0000002" and len(load_state(ckpt)["rng"]) == 2
