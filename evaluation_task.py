"""Evaluate any task from its config file: python evaluation_task.py --config my_task.yaml [--run_dir runs/...]"""

from kd.evaluation_cli import main_for_task

if __name__ == "__main__":
    main_for_task()
