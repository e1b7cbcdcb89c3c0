"""The command-line convention every ``python -m interp.*`` command follows.

- An error the user can fix (a bad argument, a malformed input file, a missing model, checkpoint
  or file, an output path that cannot be a folder) prints one line, ``error: ...``, on stderr and
  exits with status 2. These are the toolkit's own ``ValueError`` subclasses
  (``TranscriptError``, ``StoreError``, ``PositionError``, ``ResultError``...), ``OSError`` from
  reading and loading, and any types a command adds (``input_errors``).
- Any other failure prints one line too and exits with status 1 (``error: TypeName: ... (in
  file:line)`` when it is not one of the toolkit's own errors).
- ``--debug`` (accepted by every command and subcommand) shows the traceback instead.
- Output folders are checked before any work (:func:`check_output_dir`) and made only when the
  work starts (:func:`output_dir`); a command that fails having written nothing into the folders
  it made removes them again.

Every command's ``main(argv=None) -> int`` is ``run(parser, body, argv)``::

    def main(argv=None) -> int:
        return cli.run(_parser(), _run, argv)

    if __name__ == "__main__":
        sys.exit(main())
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
"""What a user fixes: bad values and files (``ValueError`` and the toolkit's subclasses of it),
paths that are missing or unusable and models that do not load (``OSError``)."""


class UsageError(ValueError):
    """An argument the user must change (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with ``--debug`` on every (sub)command and one-line errors (status 2)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's default must not undo a --debug given before it
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error")

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def one_line(e: BaseException) -> str:
    """The first line of an error's message (``KeyError`` unquoted; ``OSError`` with its path)."""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.strerror and e.filename is not None and not str(e).startswith(str(e.filename)):
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e)
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
        argv: list[str] | None = None, *, input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` and call ``body(args)``; return its exit status (None: 0), turning errors
    into one line on stderr (status 2 for input errors, 1 otherwise) unless ``--debug``."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return body(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (*INPUT_ERRORS, *input_errors) as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # the convention: one line, the traceback behind --debug
        if debug:
            raise
        if type(e).__module__.partition(".")[0] in ("interp", "probes"):  # the toolkit's own, e.g. SetupError
            print(f"error: {one_line(e)}", file=sys.stderr)
        else:
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"error: {type(e).__name__}: {one_line(e)} (in {Path(where.filename).name}:{where.lineno}; "
                  "--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


# --------------------------------------------------------------------------------------------
# Output folders


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Raise :class:`UsageError` unless ``path`` is a writable folder or can be made one. Touches
    nothing."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: the folder is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: cannot be made, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot be made, {parent} is not writable")
    return path


@contextmanager
def output_dir(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Make ``path`` (after :func:`check_output_dir`) for the work inside the block. If the block
    fails, the folders this call made are removed again as long as nothing was written in them."""
    path = Path(path)
    check_output_dir(path, flag)
    made = []  # innermost first
    p = path.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in made:
            try:
                d.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


# --------------------------------------------------------------------------------------------
# Argument types (argparse turns their errors into "argument --x: ...", status 2)


def count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def positive(text: str) -> int:
    """A whole number >= 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def count_or_all(text: str) -> int:
    """``all`` (returned as 0, which the commands document as "all") or a whole number >= 0."""
    if text.strip().lower() == "all":
        return 0
    try:
        return count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a whole number >= 0, got {text!r}") from None


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {text!r}")
    return value


def prefix_text(text: str) -> str:
    """A forced prefix: text with at least one non-whitespace character."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"the prefix {text!r} is empty or only whitespace; a forced prefix "
                                         "needs text")
    return text
