"""Per-iteration training records: ``metrics.csv`` in the output directory and a tqdm progress bar.

Both are used on the main process only (the values they get are already reduced over ranks).
``metrics.csv`` columns: ``iter`` (0-based iteration index), ``epoch`` (data epoch), ``loss`` (mean over
the batch and all ranks, full precision), ``lr``, ``samples_per_s`` (all ranks), ``n_skipped``
(unreadable samples dropped while fetching this iteration's batch, all ranks), ``grad_norm`` (before
clipping; empty on accumulation steps), ``nonfinite`` (1 when the loss was NaN/inf and the step skipped).
"""
import csv
import os

from tqdm.auto import tqdm

FIELDS = ("iter", "epoch", "loss", "lr", "samples_per_s", "n_skipped", "grad_norm", "nonfinite")


class MetricsCSV:
    """Appends rows to ``path`` (writes the header when the file is new)."""

    def __init__(self, path, fields=FIELDS):
        self.path, self.fields = path, tuple(fields)
        self._new = not os.path.exists(path) or os.path.getsize(path) == 0

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if self._new:
                writer.writeheader()
                self._new = False
            writer.writerow({k: _fmt(row.get(k)) for k in self.fields})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly: resumed and uninterrupted runs compare bit for bit
    return value


def read_metrics(path):
    """Rows of a metrics.csv as dicts of floats (empty cells become None)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


class Progress:
    """tqdm bar over ``[start, total)`` iterations showing loss, lr and samples/s; silent when disabled."""

    def __init__(self, start, total, enabled, desc="train"):
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
                        mininterval=1.0)

    def update(self, loss, lr, samples_per_s):
        if self.bar.disable:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()
