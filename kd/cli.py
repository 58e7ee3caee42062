"""argparse value types shared by the scripts: out-of-range values fail in the parser (exit 2)."""

import argparse

from kd.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage block stays in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def bounded_float(low: float):
    def parse(text: str) -> float:
        value = _number(text, float)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def unit_interval(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def canonical_student(text: str) -> str:
    from kd.students import canonical_student_name  # lazily: timm is slow to import, --help should not wait

    try:
        return canonical_student_name(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
