"""Training scalars: ``scalars.csv`` (step, tag, value) and TensorBoard when it is installed.

A resumed run re-does the steps after its checkpoint, so on resume the rows past that step are
dropped (TensorBoard: ``purge_step``) and each (step, tag) is written once."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path


class ScalarWriter:
    """``note``: called once (when enabled) with one line saying where the scalars go, so that a run
    without tensorboard says so rather than leaving the user looking for a ``tb`` folder."""

    def __init__(self, work_dir: Path, enabled: bool, resume_step=None, note=None):
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
        self.tb, message = _tensorboard(Path(work_dir), resume_step)
        if note is not None:
            note(message)

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


def _tensorboard(work_dir: Path, resume_step):
    """``(SummaryWriter or None, the line to tell the user)``; tensorboard is optional."""
    csv_only = f"scalars go to {work_dir / 'scalars.csv'}"
    try:
        from torch.utils.tensorboard import SummaryWriter
        purge = None if resume_step is None else int(resume_step) + 1
        tb = SummaryWriter(str(work_dir / "tb"), purge_step=purge)
    except Exception as e:
        try:
            missing = importlib.util.find_spec("tensorboard") is None
        except (ImportError, ValueError):
            missing = True
        first = (str(e).strip().splitlines() or [""])[0]  # one line, whatever the exception holds
        why = "tensorboard is not installed (pip install tensorboard)" if missing else f"{type(e).__name__}: {first}"
        return None, f"TensorBoard logging off: {why}; {csv_only}"
    return tb, f"TensorBoard: tensorboard --logdir {work_dir / 'tb'}"


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
