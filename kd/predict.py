"""Classify image files with a run's student: the top-k classes and their probabilities.

Each image is prepared the way the task's training images were (grayscale or RGB, resized to the
input size, scaled to [0, 1]); the student normalises its input itself.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from kd.files import atomic_write
from kd.cli import ArgumentParser, positive_int
from kd.config import TaskConfig
from kd.augment import center_crop
from kd.images import IMAGE_SUFFIXES, list_images, read_image
from kd.errors import UserError, run_cli
from kd.record import open_run_student

BATCH_SIZE = 256


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), the most probable first


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named and those below the folders named, in the order given."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise UserError(f"{item} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"no such file or folder: {item}")
    return paths


def load_images(paths: Sequence[Path], task: TaskConfig) -> torch.Tensor:
    """float [0, 1] images (N, C, H, W), prepared as the task evaluates: resized to its decode size and
    centre-cropped to its input size."""
    images = [read_image(path, task.data.channels, task.decode_size)
              for path in tqdm(paths, desc="reading images", leave=False, disable=len(paths) < 100)]
    return center_crop(torch.from_numpy(np.stack(images)), task.data.input_size).float().div_(255.0)


@torch.inference_mode()
def class_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk).softmax(dim=1) for chunk in images.split(BATCH_SIZE)])


def predict_images(inputs: Sequence[str | Path], run_dir=None, checkpoint=None, topk: int = 3) -> list[Prediction]:
    """The top-k classes of every image in `inputs` (files and folders) by the student of a run."""
    model, record, _ = open_run_student(run_dir, checkpoint)
    task = record.task
    paths = collect_images(inputs)
    probs, indices = class_probabilities(model, load_images(paths, task)).topk(min(topk, task.num_classes), dim=1)
    return [Prediction(path, [(task.classes[i], p) for i, p in zip(row_indices, row_probs)])
            for path, row_indices, row_probs in zip(paths, indices.tolist(), probs.tolist())]


def format_predictions(predictions: Sequence[Prediction]) -> str:
    width = max(len(str(p.path)) for p in predictions)
    return "\n".join(f"{str(p.path):<{width}}  " + "  ".join(f"{name} {prob:.3f}" for name, prob in p.top)
                     for p in predictions)


def write_csv(predictions: Sequence[Prediction], path: Path) -> None:
    """One row per image: path, class_1, probability_1, class_2, probability_2, ..."""
    k = len(predictions[0].top)
    header = ["path"] + [f"{column}_{rank}" for rank in range(1, k + 1) for column in ("class", "probability")]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([str(p.path)] + [v for name, prob in p.top for v in (name, f"{prob:.6f}")]
                             for p in predictions)
    try:
        atomic_write(path, write)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Classify images with a trained student: the top-k classes and their "
                                   "probabilities, printed or written as CSV.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, and folders whose images (searched recursively) are all classified")
    p.add_argument("--run_dir", default=None, help="a run folder made by train.py; its student is used")
    p.add_argument("--checkpoint", default=None,
                   help="student weights (default: the run's student.safetensors); its folder is the run "
                        "when --run_dir is not given")
    p.add_argument("--topk", type=positive_int, default=3, help="how many classes to show per image")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the predictions to this CSV file")
    return p


def main(argv: list[str] | None = None) -> None:
    """The whole of predict.py."""
    args = get_args_parser().parse_args(argv)

    def run():
        predictions = predict_images(args.inputs, args.run_dir, args.checkpoint, args.topk)
        if args.csv:
            write_csv(predictions, Path(args.csv))
            print(f"wrote {args.csv}: the top {len(predictions[0].top)} classes of {len(predictions)} image(s)")
        else:
            print(format_predictions(predictions))

    run_cli(run)
