"""Human-readable results: one task's metrics as text, and the cross-task summary.

Everything except write_json and run_streaming is a pure function of metrics.json contents, so it
is testable without models. Ratios are "how many times": size ratio = best teacher's parameters / student's,
speed-ups = student's throughput / the other's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kd.files import atomic_write


def _millions(params: int) -> str:
    return f"{params / 1e6:.2f}M"


def format_task_result(metrics: dict) -> str:
    """A few lines: one per model (params, accuracy, ECE, speed) and the agreement."""
    student, ensemble = metrics["student"], metrics["ensemble"]
    source = metrics["provenance"]
    models = [(f"student {student['name']}", student)]
    models += [(f"teacher {name} ({t['arch']})", t) for name, t in metrics["teachers"].items()]
    models.append((f"ensemble ({ensemble['weighting']}, T={ensemble['temperature']:g})", ensemble))
    width = max(len(name) for name, _ in models) + 2
    lines = [f"task {metrics['task']}: {source['checkpoint']} (epoch {source['checkpoint_epoch']}), "
             f"{source['test_size']} test images",
             f"  {'model':<{width}}{'params':>9}{'test acc':>10}{'ECE':>8}{'ms/image':>10}{'images/s':>10}"]
    for name, entry in models:
        ece = f"{entry['ece']:.4f}" if "ece" in entry else "-"
        lines.append(f"  {name:<{width}}{_millions(entry['params']):>9}{entry['accuracy']:>10.2%}{ece:>8}"
                     f"{entry['latency_ms']:>10.2f}{entry['throughput']:>10.0f}")
    lines.append(f"  student-ensemble top-1 agreement {ensemble['agreement_with_student']:.2%}, "
                 f"student macro F1 {student['macro']['f1']:.4f}")
    lines.append(f"  wrote metrics.json and {len(metrics['figures'])} figures to {source['output_dir']}")
    return "\n".join(lines)


def task_row(task: str, metrics: dict) -> dict:
    """One summary row from a task's metrics.json."""
    student, ensemble = metrics["student"], metrics["ensemble"]
    best_name, best = max(metrics["teachers"].items(), key=lambda item: item[1]["accuracy"])
    return {"task": task, "status": "ok", "student": student["name"], "student_acc": student["accuracy"],
            "best_teacher": best_name, "best_teacher_acc": best["accuracy"], "ensemble_acc": ensemble["accuracy"],
            "gap_vs_best_teacher_pp": 100.0 * (student["accuracy"] - best["accuracy"]),
            "size_ratio": best["params"] / student["params"],
            "speedup_vs_best_teacher": student["throughput"] / best["throughput"],
            "speedup_vs_ensemble": student["throughput"] / ensemble["throughput"]}


def failed_row(task: str, reason: str) -> dict:
    return {"task": task, "status": "failed", "reason": reason or "failed without a message"}


def build_summary(outcomes: dict[str, dict | str]) -> dict:
    """outcomes: task -> its metrics.json contents, or the reason it has none."""
    rows = [task_row(task, o) if isinstance(o, dict) else failed_row(task, o) for task, o in outcomes.items()]
    return {"ok": all(row["status"] == "ok" for row in rows), "tasks": rows}


COLUMNS = (("task", "task", "{}"), ("student", "student", "{}"), ("student_acc", "student acc", "{:.2%}"),
           ("best_teacher_acc", "best teacher acc", "{:.2%}"), ("ensemble_acc", "ensemble acc", "{:.2%}"),
           ("gap_vs_best_teacher_pp", "gap (pp)", "{:+.2f}"), ("size_ratio", "size ratio", "{:.2f}x"),
           ("speedup_vs_best_teacher", "speed vs best", "{:.2f}x"),
           ("speedup_vs_ensemble", "speed vs ensemble", "{:.2f}x"))


def format_evaluation_summary(summary: dict) -> str:
    """A fixed-width table; a failed task's row says why instead of numbers."""
    widths = [max(len(title), 9) for _, title, _ in COLUMNS]
    lines = ["  ".join(title.rjust(w) for (_, title, _), w in zip(COLUMNS, widths))]
    for row in summary["tasks"]:
        if row["status"] == "ok":
            cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(cells, widths)))
        else:
            lines.append(f"{row['task'].rjust(widths[0])}  FAILED: {row['reason']}")
    lines.append("gap = student - best teacher accuracy (percentage points); size ratio = best teacher params / "
                 "student params; speed = student images/s / the other's (CPU, batch 64)")
    return "\n".join(lines)


def last_line(text: str) -> str:
    """The last non-empty line of a program's stderr; progress bars redraw with \\r, so split on it too."""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
    return next((line for line in reversed(lines) if line), "")


def run_streaming(command: Sequence[str], tail_bytes: int = 4096) -> tuple[int, str]:
    """Run `command`, passing its stdout and stderr through live; returns (exit code, stderr's last line).

    stderr is forwarded in raw chunks rather than lines, so progress bars redraw in place.
    """
    tail = b""
    with subprocess.Popen(list(command), stderr=subprocess.PIPE) as process:
        while chunk := process.stderr.read1(4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-tail_bytes:]
    return process.returncode, last_line(tail.decode("utf-8", errors="replace"))


def write_json(data: dict, path: Path) -> None:
    """Write through a temporary file and a rename (kd.files.atomic_write), so a reader never
    sees half a file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))