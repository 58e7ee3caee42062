"""Evaluate both tasks, each in its own process, then print and save a summary: python evaluation.py"""

import argparse
import json
import sys
from pathlib import Path

from kd.cli import ArgumentParser
from kd.report import build_summary, format_evaluation_summary, run_streaming, write_json

TASK_SCRIPTS = {"A": "evaluation_taska.py", "B": "evaluation_taskb.py"}


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Evaluate tasks A and B (evaluation_taska.py, evaluation_taskb.py) and "
                                   "summarise student vs teachers.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="device for the test-set passes; speed is always measured on CPU")
    p.add_argument("--runs_root", default="runs", help="folder holding the run folders")
    p.add_argument("--output_dir", default="evaluation",
                   help="results go to OUTPUT_DIR/TaskA, OUTPUT_DIR/TaskB and OUTPUT_DIR/summary.json")
    return p


def evaluate_in_subprocess(task: str, args: argparse.Namespace) -> dict | str:
    """The task's metrics.json contents, or why there are none (its script's last stderr line)."""
    script = Path(__file__).resolve().parent / TASK_SCRIPTS[task]
    out = Path(args.output_dir) / f"Task{task}"
    print(f"=== task {task}: {script.name}", flush=True)
    status, last_line = run_streaming([sys.executable, str(script), "--device", args.device,
                                       "--runs_root", args.runs_root, "--output_dir", str(out)])
    if status != 0:
        return last_line or f"{script.name} exited with status {status}"
    return json.loads((out / "metrics.json").read_text())


def main(args: argparse.Namespace) -> int:
    summary = build_summary({task: evaluate_in_subprocess(task, args) for task in TASK_SCRIPTS})
    path = Path(args.output_dir) / "summary.json"
    write_json(summary, path)
    print(f"\n{format_evaluation_summary(summary)}\nwrote {path}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
