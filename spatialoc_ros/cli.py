"""What every command-line tool of the package shares: range checks that catch NaN, output
paths checked before the work starts, and one line on stderr (never a traceback) for a user error.

Usage in a CLI::

    def main(argv=None) -> int:
        with user_errors("python -m spatialoc_ros.training.coarse"):
            ...
        ...

    check_number(parser, "--learning_rate", args.learning_rate, low=0, low_open=True)
    check_output_file(parser, "--out_json", args.out_json)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
from typing import Iterator, Optional


#: Values of --device: auto (CUDA when present), cpu, cuda, cuda:N.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: auto | cpu | cuda | cuda:N."""
    name = text.strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise argparse.ArgumentTypeError(f"use auto, cpu, cuda or cuda:N, got {text!r}")
    return name


class UserError(Exception):
    """A mistake of the user's (bad file, bad value): printed as one line, exit code 2."""


def check_number(parser: argparse.ArgumentParser, flag: str, value, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False) -> None:
    """parser.error unless ``value`` is a finite number in [low, high] (``low_open``: > low)."""
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        ok = isinstance(v, (int, float)) and math.isfinite(float(v))
        if ok and low is not None:
            ok = float(v) > low if low_open else float(v) >= low
        if ok and high is not None:
            ok = float(v) <= high
        if not ok:
            bounds = []
            if low is not None:
                bounds.append(f"{'>' if low_open else '>='} {low:g}")
            if high is not None:
                bounds.append(f"<= {high:g}")
            parser.error(f"{flag} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got {v}")


def _writable_folder(folder: str) -> Optional[str]:
    """None when files can be created in ``folder`` (created if missing), else the reason."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder {folder}: {e.strerror or e}"
    if not os.path.isdir(folder):
        return f"{folder} exists and is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".spatialoc-write-test-"):
            pass
    except OSError as e:
        return f"cannot write in {folder}: {e.strerror or e}"
    return None


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: Optional[str]) -> None:
    """parser.error unless ``path`` can be written (checked now, before the work)."""
    if path is None:
        return
    if os.path.isdir(path):
        parser.error(f"{flag} {path} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        parser.error(f"{flag} {path}: the file is not writable")
    why = _writable_folder(os.path.dirname(os.path.abspath(path)))
    if why:
        parser.error(f"{flag} {path}: {why}")


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: Optional[str]) -> None:
    """parser.error unless files can be written in the folder ``path`` (created if missing)."""
    if path is None:
        return
    why = _writable_folder(os.path.abspath(path))
    if why:
        parser.error(f"{flag} {path}: {why}")


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn the errors a user causes into one ``prog: error: ...`` line and exit code 2:
    UserError, files that cannot be read (checkpoints, data), permissions."""
    from spatialoc_ros.data.loading import DataFormatError
    from spatialoc_ros.data.safe_pickle import UnsafePickleError
    from spatialoc_ros.models.checkpoint import CheckpointError

    try:
        yield
    except (UserError, DataFormatError, UnsafePickleError, CheckpointError, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
