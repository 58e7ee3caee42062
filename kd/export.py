"""Export a run's student for deployment: ONNX and TorchScript, checked against PyTorch on the task's
real test images, with file sizes and CPU latency.

The exported models take float [0, 1] images (N, C, H, W) of the task's input size, N free, and
return logits (N, classes); they normalise their input themselves, like the PyTorch student.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn as nn

from kd.augment import center_crop
from kd.batches import input_size
from kd.cli import ArgumentParser
from kd.data import load_task_data
from kd.errors import UserError, run_cli
from kd.record import RunRecord, open_run_student
from kd.speed import median_seconds, torch_threads

ONNX_FILE, TORCHSCRIPT_FILE = "student.onnx", "student.torchscript.pt"
ONNX_OPSET = 18
# Parity: max |logit difference| <= PARITY_RTOL * max(1, largest |PyTorch logit|). The exported
# graphs compute the same fp32 function with other kernels and another summation order, and fp32
# rounding grows with the logits: on trained students (logits up to ~40) PyTorch's own fp32 result
# is ~2e-6 x max|logit| from float64, and ONNX Runtime is as far from PyTorch (8.5e-5 at 39), so a
# fixed 1e-4 would sit on the noise floor. 2e-5 relative leaves a 10x margin over that noise; a
# wrong operator, layout or normalisation changes logits by 1e-3 relative or more.
PARITY_RTOL = 2e-5
PARITY_IMAGES = 256
LATENCY_WARMUP, LATENCY_RUNS = 10, 50

Runtime = Callable[[torch.Tensor], torch.Tensor]  # float images -> logits


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    input_shape: tuple[int, ...]  # one image: (channels, height, width)
    classes: tuple[str, ...]  # the order of the logits
    sizes: dict[str, int]  # file path -> bytes
    parity_images: int
    tolerance: float  # the largest |logit difference| allowed on those images
    max_abs_diff: dict[str, float]  # runtime -> largest |logit difference| from PyTorch
    top1_agreement: dict[str, float]  # runtime -> fraction of images with PyTorch's top-1 class
    latency_ms: dict[str, float]  # runtime -> median milliseconds per call at batch 1, one CPU thread


def export_student(run_dir=None, output_dir=None, checkpoint=None) -> ExportResult:
    """Write the run's student as ONNX and TorchScript into output_dir (default RUN/export).

    Both files are written to a staging folder and moved into place only after their outputs on
    the task's test images matched PyTorch's (see PARITY_RTOL).
    """
    model, record, weights = open_run_student(run_dir, checkpoint)
    images = parity_images(record)
    out = Path(output_dir) if output_dir else record.run_dir / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror or err}; pass a writable --output_dir") from None
    example = images[:1].repeat(2, 1, 1, 1)  # batch 2: torch.export would fix a batch of 1 as a constant
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as staging:
        onnx_path = write_onnx(model, example, Path(staging) / ONNX_FILE)
        torchscript_path = write_torchscript(model, example, Path(staging) / TORCHSCRIPT_FILE)
        runtimes = load_runtimes(model, torchscript_path, onnx_path)
        tolerance, diffs, agreement = compare_outputs(runtimes, images)
        for path in (onnx_path, torchscript_path):
            os.replace(path, out / path.name)
    sizes = {str(path): path.stat().st_size for path in (weights, out / ONNX_FILE, out / TORCHSCRIPT_FILE)}
    return ExportResult(out, tuple(images.shape[1:]), record.task.classes, sizes, len(images), tolerance, diffs,
                        agreement, measure_latency(runtimes, images[:1]))


def parity_images(record: RunRecord) -> torch.Tensor:
    """Up to PARITY_IMAGES test images of the run's task as float [0, 1], spread evenly over the split
    (an image-folder split is ordered by class), as evaluation feeds them (centre-cropped)."""
    settings = record.settings
    test = load_task_data(record.task, settings.data_dir, settings.data_storage, settings.num_workers).test
    index = torch.linspace(0, len(test) - 1, min(len(test), PARITY_IMAGES)).round().long()
    images = torch.stack([test.image(i) for i in index.tolist()])
    return center_crop(images, input_size(test)).float().div_(255.0)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                      input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    return path


@contextmanager
def torchscript_allowed() -> Iterator[None]:
    """Silence torch.jit's deprecation warnings: it is deprecated in favour of torch.export, but
    TorchScript is still what LibTorch (C++) and PyTorch Mobile deployments load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        yield


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with torchscript_allowed():
        torch.jit.trace(model, example).save(str(path))
    return path


def load_runtimes(model: nn.Module, torchscript_path: Path, onnx_path: Path) -> dict[str, Runtime]:
    """The student in PyTorch, and the two exported files loaded back, as functions images -> logits."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # like PyTorch's timing, in kd.speed
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    with torchscript_allowed():
        scripted = torch.jit.load(str(torchscript_path))
    return {"PyTorch": model, "TorchScript": scripted,
            "ONNX Runtime": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])}


@torch.inference_mode()
def compare_outputs(runtimes: dict[str, Runtime], images: torch.Tensor) -> tuple[float, dict, dict]:
    """(tolerance, {runtime: max |logit difference| from PyTorch}, {runtime: top-1 agreement});
    a difference above the tolerance is a UserError."""
    outputs = {name: run(images) for name, run in runtimes.items()}
    reference = outputs.pop("PyTorch")
    tolerance = PARITY_RTOL * max(1.0, reference.abs().max().item())
    diffs = {name: (logits - reference).abs().max().item() for name, logits in outputs.items()}
    agreement = {name: (logits.argmax(1) == reference.argmax(1)).float().mean().item()
                 for name, logits in outputs.items()}
    failed = {name: diff for name, diff in diffs.items() if diff > tolerance}
    if failed:
        found = ", ".join(f"{name} {diff:.2e}" for name, diff in failed.items())
        raise UserError(f"exported model(s) differ from PyTorch on {len(images)} test images by up to {found}, "
                        f"more than the tolerance {tolerance:.2e}; nothing was written")
    return tolerance, diffs, agreement


def measure_latency(runtimes: dict[str, Runtime], image: torch.Tensor) -> dict[str, float]:
    with torch_threads(1), torch.inference_mode():
        return {name: 1000.0 * median_seconds(lambda run=run: run(image), LATENCY_WARMUP, LATENCY_RUNS)
                for name, run in runtimes.items()}


def format_export(result: ExportResult) -> str:
    width = max(len(path) for path in result.sizes)
    shape = ", ".join(map(str, result.input_shape))
    lines = [f"wrote {ONNX_FILE} and {TORCHSCRIPT_FILE} to {result.output_dir}: input 'images', float [0, 1] "
             f"(N, {shape}); output 'logits' (N, {len(result.classes)}), classes {', '.join(result.classes)}",
             "files:"]
    lines += [f"  {path:<{width}}  {size / 1e6:7.2f} MB" for path, size in result.sizes.items()]
    lines.append(f"parity with PyTorch on {result.parity_images} test images (tolerance: max |logit "
                 f"difference| <= {PARITY_RTOL:g} x max |logit| = {result.tolerance:.2e}):")
    lines += [f"  {name:<13} max |logit difference| {result.max_abs_diff[name]:.2e}, "
              f"top-1 agreement {result.top1_agreement[name]:.2%}" for name in result.max_abs_diff]
    lines.append(f"CPU latency at batch 1 (1 thread, median of {LATENCY_RUNS} calls after {LATENCY_WARMUP} warm-up):")
    lines += [f"  {name:<13} {ms:7.3f} ms" for name, ms in result.latency_ms.items()]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=f"Export a run's student as ONNX (opset {ONNX_OPSET}, dynamic batch) and "
                                   "TorchScript, check both against PyTorch on the task's test images, and "
                                   "print file sizes and CPU latency.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run_dir", default=None, help="a run folder made by train.py")
    p.add_argument("--checkpoint", default=None,
                   help="student weights (default: the run's student.safetensors); its folder is the run "
                        "when --run_dir is not given")
    p.add_argument("--output_dir", default=None, help="where the exported files go (default: RUN/export)")
    return p


def main(argv: list[str] | None = None) -> None:
    """The whole of export.py."""
    args = get_args_parser().parse_args(argv)
    run_cli(lambda: print(format_export(export_student(args.run_dir, args.output_dir, args.checkpoint))))
