"""Evaluate task B (Fashion-MNIST): python evaluation_taskb.py [--run_dir runs/TaskB_...] [--device cuda]"""

from kd.evaluation_cli import main_for_task

if __name__ == "__main__":
    main_for_task("B")
