"""Evaluate task A (digits): python evaluation_taska.py [--run_dir runs/TaskA_...] [--device cuda]"""

from kd.evaluation_cli import main_for_task

if __name__ == "__main__":
    main_for_task("A")
