"""Two gloo processes (as torchrun would start them) against one process with the same global batch."""
import copy
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from senformer.engine.config import load_config
from senformer.engine.trainer import train


def _cfg():
    # ratio_range >= 1 keeps every crop free of padding, so both ranks average over the same number
    # of labelled pixels and the mean of the two ranks' gradients equals the full-batch gradient
    return load_config(None, [
        ("model.preset", "toy"), ("data.options", {"size": [40, 40]}), ("data.scale", [40, 40]),
        ("data.ratio_range", [1.0, 1.5]), ("data.crop_size", [32, 32]), ("data.batch_size", 4),
        ("data.num_workers", 0), ("data.val_options", {"length": 4}), ("schedule.iters", 5),
        ("schedule.warmup_iters", 1), ("checkpoint.interval", 0), ("log.interval", 1), ("optim.lr", 3e-3),
        ("device", "cpu")])


def _worker(rank, world, port, work_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from senformer.engine import distributed as du
    try:
        res = train(_cfg(), work_dir, progress=False, print_fn=lambda *_: None)
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


def test_two_gloo_processes_match_one_process(tmp_path):
    single = train(copy.deepcopy(_cfg()), tmp_path / "one", progress=False, print_fn=lambda *_: None)
    out = tmp_path / "ddp.json"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "two"), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    ddp = json.loads(out.read_text())
    assert len(ddp["losses"]) == len(single["losses"]) == 5
    for a, b in zip(single["losses"], ddp["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    num, den = 0.0, 0.0
    for k, v in single["model"].state_dict().items():
        d = torch.tensor(ddp["params"][k], dtype=v.dtype)
        num += float((d - v).double().norm() ** 2)
        den += float(v.double().norm() ** 2)
    assert (num / den) ** 0.5 < 1e-5
    assert abs(ddp["mIoU"] - single["metrics"]["mIoU"]) < 1e-6
    # the parameters did move: the comparison is not between two untouched initialisations
    init = train(copy.deepcopy(_cfg()), tmp_path / "zero", stop_after=0, progress=False)["model"]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(init.state_dict().values(),
                                                            single["model"].state_dict().values()))
    assert moved > 0
