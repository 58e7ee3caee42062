"""A run's logs: the console and train.log, metrics.csv and TensorBoard events (its record: kd.record)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml
from tqdm import tqdm

from kd.files import atomic_write

log = logging.getLogger("kd")


class TqdmHandler(logging.Handler):
    """Write log records through tqdm so they do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(quiet: bool = False) -> None:
    """Log INFO to stderr (WARNING when quiet: the other processes of a distributed run, a tuner's
    trials); run folders add their train.log, which keeps INFO, with `log_to_file`."""
    logger = logging.getLogger("kd")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = TqdmHandler()
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    logger.propagate = False


@contextmanager
def log_to_file(log_file: Path | None):
    """Also write the log to `log_file` (a run folder's train.log) inside the block; closed after it,
    so a teacher's run nested in a student's command keeps its own log and the folder can be removed."""
    if log_file is None:
        yield
        return
    logger = logging.getLogger("kd")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def write_yaml(data: dict, path: Path) -> None:
    plain = json.loads(json.dumps(data, default=str))  # tuples -> lists, paths and versions -> str
    path.write_text(yaml.safe_dump(plain, sort_keys=False))


class MetricsLog:
    """metrics.csv (one row per epoch) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.csv"
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(_csv_row(row))
        for key, value in row.items():
            if key != "epoch":
                self.tb.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
        self.tb.flush()

    def rewrite(self, rows: list[dict]) -> None:
        """Replace metrics.csv with `rows` (a resumed run's history; later rows were never checkpointed)."""
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(_csv_row(r) for r in rows)
        if rows:
            atomic_write(self.path, write)

    def close(self) -> None:
        self.tb.close()


def _csv_row(row: dict) -> dict:
    return {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}


def read_metrics(path: Path) -> list[dict[str, float]]:
    with Path(path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
