"""Training scalars: ``scalars.csv`` (step, tag, value) and TensorBoard when it is installed.

A resumed run re-does the steps after its checkpoint, so on resume the rows past that step are
dropped (TensorBoard: ``purge_step``) and each (step, tag) is written once."""
from __future__ import annotations

import csv
from pathlib import Path


class ScalarWriter:
    def __init__(self, work_dir: Path, enabled: bool, resume_step=None):
        self.enabled, self.tb, self.seen = enabled, None, set()
        if not enabled:
            return
        path = Path(work_dir) / "scalars.csv"
        if resume_step is not None and path.is_file():
            self.seen = _truncate(path, int(resume_step))
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if self.f.tell() == 0:
            self.w.writerow(["step", "tag", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter
            purge = None if resume_step is None else int(resume_step) + 1
            self.tb = SummaryWriter(str(Path(work_dir) / "tb"), purge_step=purge)
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, step, tag, value):
        if not self.enabled or (step, tag) in self.seen:
            return
        self.seen.add((step, tag))
        self.w.writerow([step, tag, f"{value:.6g}"])
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def flush(self):
        if self.enabled:
            self.f.flush()

    def close(self):
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _truncate(path: Path, last_step: int) -> set:
    """Keep the rows up to ``last_step``; return the (step, tag) pairs kept at that step."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[:1], [r for r in rows[1:] if len(r) == 3 and r[0].isdigit() and int(r[0]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(header + body)
    tmp.replace(path)
    return {(int(r[0]), r[1]) for r in body if int(r[0]) == last_step}
