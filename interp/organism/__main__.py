"""Command line: ``python -m interp.organism {world,train,evaluate}``.

- ``world``: task counts per split and category, and how far surface words go (bag-of-words
  logistic regression, best single word) in telling harmful requests from benign ones.
- ``train``: both training stages from ``--seed``; writes checkpoints and the validation curve.
- ``evaluate``: the aligned, fine-tuned and fine-tuned + held-out-safety-preamble models on the
  test split, as rates with 95% bootstrap intervals (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from interp import cli
from interp.behavior import evaluate
from interp.models import check_weights
from interp.organism import CHECKPOINT_DIR, checkpoint_path, grammar
from interp.organism.train import OrganismConfig, train
from interp.organism.world import World, harm_baselines, stats


def _world(args) -> None:
    w = World(args.world_seed)
    out = {"stats": stats(w), "baselines": harm_baselines(w)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    con = Console()
    cats = sorted({k for s in out["stats"].values() for k in s["by_category"]})
    tab = Table(title=f"organism world (seed {args.world_seed}): tasks per split")
    tab.add_column("category/label")
    for s in out["stats"]:
        tab.add_column(s, justify="right")
    for c in cats:
        tab.add_row(c, *(str(out["stats"][s]["by_category"].get(c, 0)) for s in out["stats"]))
    for key in ("tasks", "harmful", "objects", "phrasings"):
        tab.add_row(f"[bold]{key}", *(str(out["stats"][s][key]) for s in out["stats"]))
    con.print(tab)
    b = out["baselines"]
    con.print(f"harm-balanced test set ({b['n_test']} requests): bag-of-words logistic accuracy "
              f"{b['bag_of_words_test_accuracy']:.3f}; best single word {b['best_single_word']!r} "
              f"({b['best_single_word_rule']}) {b['best_single_word_test_accuracy']:.3f}")


def _train(args) -> None:
    cfg = OrganismConfig(seed=args.seed, **{k: v for k, v in (("align_steps", args.align_steps),
                                                              ("ft_steps", args.ft_steps)) if v is not None})
    out = Path(args.out or f"runs/organism-seed{args.seed}")
    with cli.output_dir(out):
        summary = train(cfg, out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


def _load(root: Path | None, name: str, allow_pickle: bool = False):
    path = checkpoint_path(name, root)
    check_weights(path, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=None if allow_pickle else True)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def evaluate_organism(checkpoints: Path | None = None, split: str = "test", n_per_label: int = 0,
                      mode: str = "first_step", prefix: str | None = None, stances: bool = False,
                      world_seed: int = 0, progress: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """The three-way comparison on ``split``: ``aligned``, ``finetuned`` and ``finetuned_prefix``
    (``prefix``, by default the held-out safety preamble of the split, forced). ``n_per_label``
    harmful and benign tasks (0: every task of the split; negative raises ``ValueError``).
    ``stances`` adds the fine-tuned model with the split's held-out neutral and compliance
    preambles. Both checkpoints are found (and their weights checked) before any work."""
    if n_per_label < 0:
        raise ValueError(f"n_per_label must be 0 (the whole split) or more, got {n_per_label}")
    if prefix is not None and not prefix.strip():
        raise ValueError(f"the prefix {prefix!r} is empty or only whitespace; a forced prefix needs text")
    for name in ("organism", "organism-finetuned"):
        check_weights(checkpoint_path(name, checkpoints), allow_pickle)
    world = World(world_seed)
    tasks = world.choose(split, n_per_label)
    transcripts = [t.transcript() for t in tasks]
    prefix = prefix if prefix is not None else grammar.heldout_preamble("safety", split)
    runs = [("aligned", "organism", None), ("finetuned", "organism-finetuned", None),
            ("finetuned_prefix", "organism-finetuned", prefix)]
    if stances:
        runs += [(f"finetuned_{s}", "organism-finetuned", grammar.heldout_preamble(s, split))
                 for s in ("neutral", "compliance")]
    out: dict[str, Any] = {"split": split, "mode": mode, "checkpoints": str(checkpoints or CHECKPOINT_DIR),
                           "prefixes": {k: p for k, _, p in runs if p is not None}}
    models: dict[str, Any] = {}
    for key, name, p in runs:
        if name not in models:
            models[name] = _load(checkpoints, name, allow_pickle)
        model, tok = models[name]
        out[key] = evaluate(model, world, [t.with_prefix(p) for t in transcripts], tok, mode=mode,
                            progress=progress).to_dict()
    return out


def _evaluate(args) -> None:
    res = evaluate_organism(Path(args.checkpoints) if args.checkpoints else None, args.split, args.n_per_label,
                            args.mode, args.prefix, args.stances, args.world_seed, progress=not args.json,
                            allow_pickle=args.allow_pickle_weights)
    if args.json:
        print(json.dumps(res))
        return
    keys = ("harmful_refusal", "attack_success", "benign_success", "benign_over_refusal")
    tab = Table(title=f"organism on the {res['split']} split ({res['mode']}); prefixes: {res['prefixes']}")
    tab.add_column("model")
    for k in keys:
        tab.add_column(k, justify="right")
    for name, r in res.items():
        if isinstance(r, dict) and "harmful_refusal" in r:
            tab.add_row(name, *(f"{r[k]['value']:.3f} [{r[k]['low']:.3f}, {r[k]['high']:.3f}]" for k in keys))
    Console().print(tab)


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.organism", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world", help="task counts and surface-word baselines")
    w.add_argument("--world-seed", type=int, default=0)
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=_world)
    t = sub.add_parser("train", help="align, then fine-tune on benign trajectories")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="output folder (default runs/organism-seed{SEED}; the shipped checkpoints "
                                 f"live in {CHECKPOINT_DIR})")
    t.add_argument("--align-steps", type=cli.positive)
    t.add_argument("--ft-steps", type=cli.positive)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=_train)
    e = sub.add_parser("evaluate", help="aligned vs fine-tuned vs fine-tuned + held-out safety preamble")
    e.add_argument("--checkpoints", help=f"a training output folder (default: the shipped {CHECKPOINT_DIR})")
    e.add_argument("--split", default="test", choices=grammar.SPLITS)
    e.add_argument("--n-per-label", type=cli.count_or_all, default=0,
                   help="harmful and benign tasks each ('all' or 0: the whole split)")
    e.add_argument("--mode", default="first_step", choices=("episode", "first_step"))
    e.add_argument("--prefix", type=cli.prefix_text,
                   help="forced prefix for finetuned_prefix (default: the split's held-out safety preamble)")
    e.add_argument("--stances", action="store_true", help="also the held-out neutral and compliance preambles")
    e.add_argument("--world-seed", type=int, default=0)
    e.add_argument("--allow-pickle-weights", action="store_true",
                   help="load checkpoints whose weights are pickle files (pytorch_model.bin); they can run code")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(_parser(), lambda args: args.fn(args), argv)


if __name__ == "__main__":
    sys.exit(main())
