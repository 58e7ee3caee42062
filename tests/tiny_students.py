"""`python -m tests.tiny_students SCRIPT ARGV` runs `python SCRIPT ARGV` (train.py, tune.py) with every student
built as a tiny model of its family, as the tiny_students fixture does in the test process: for tests that
kill or signal a run, which must be a process of its own."""

import runpy
import sys

from kd.settings import STUDENT_ARCHS
from tests.conftest import TINY_STUDENTS

if __name__ == "__main__":
    STUDENT_ARCHS.update(TINY_STUDENTS)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
