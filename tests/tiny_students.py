"""`python tests/tiny_students.py SCRIPT ARGV` runs `python SCRIPT ARGV` (train.py, tune.py) with every
student built as a tiny model of its family, as the tiny_students fixture does in the test process: for
tests that kill or signal a run, which must be a process of its own."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what `python SCRIPT` puts first on the path for the project's scripts, all in ROOT; it also finds tests/
sys.path[0] = str(ROOT)

from kd.settings import STUDENT_ARCHS  # noqa: E402 (after the path is set)
from tests.conftest import TINY_STUDENTS  # noqa: E402

if __name__ == "__main__":
    STUDENT_ARCHS.update(TINY_STUDENTS)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
