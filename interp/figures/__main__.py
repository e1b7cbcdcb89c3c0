"""``python -m interp.figures``: the paper's figures from stored results (see :mod:`interp.figures`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from interp import cli
from interp.figures import __doc__ as package_doc
from interp.figures.write import write_figures


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.figures", description=package_doc.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("runs/demo/results"), help="result files (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output directory (default %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated figures to render, e.g. F1,F4 (default all)")
    p.add_argument("--no-png", action="store_true", help="write HTML only (removes a re-rendered figure's older PNG)")
    return p


def _run(args) -> int:
    only = [k.strip().upper() for k in args.only.split(",") if k.strip()] if args.only else None
    with cli.output_dir(args.out):
        done = write_figures(args.results, args.out, only=only, png=not args.no_png)
    for s in done.figures:
        if only is None or s.key in only:
            print(f"{s.key}  {args.out / s.stem}.html{' + .png' if (args.out / f'{s.stem}.png') in done.files else ''}")
    for note in done.notes:
        print(note)
    print(f"index: {args.out / 'README.md'}")
    return 1 if done.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_parser(), _run, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
