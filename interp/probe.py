"""``python -m interp.probe --layer N``: refusal probes per layer, before and after fine-tuning
and with a forced prefix, on the built-in organism by default.

It caches the decision-position residual stream of three conditions (the aligned model, the
fine-tuned model, the fine-tuned model with ``--prefix``), labels what each model did on every
task with the refusal judge (first agent step, greedy), and runs :func:`interp.compare.compare`.
It prints a table per layer, writes ``comparison.json`` to ``--out``, and with ``--json`` prints
that object instead::

    python -m interp.probe --layer all
    python -m interp.probe --layer 3 --json
    python -m interp.probe --aligned meta-llama/Llama-3.1-8B-Instruct --finetuned ./my-agent-ft \\
        --dataset tasks.jsonl --prefix "I will first check whether this task is safe." --layer all
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from interp import cli
from interp.atomic import save_json
from interp.behavior import RefusalJudge, generate, parse_reply, settled_reply
from interp.cache import check_context
from interp.compare import CONDITIONS, Comparison, cache_conditions, check_prefix, check_split, compare
from interp.models import load_model
from interp.organism import World, grammar
from interp.positions import Selector, parse
from interp.transcripts import Transcript, TranscriptError, binary_labels, load_jsonl, render

DEFAULT_OUT = Path("runs/probe")


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", required=True, help="a layer index, a comma-separated list, or 'all'")
    p.add_argument("--aligned", default="organism", help="aligned model: 'organism', a hub id or a local path")
    p.add_argument("--finetuned", default="organism-finetuned", help="fine-tuned model (same forms)")
    p.add_argument("--backend", default="hf", choices=("hf", "bridge", "nnsight"))
    p.add_argument("--site", default="resid_post", choices=("resid_pre", "resid_mid", "resid_post"))
    p.add_argument("--positions", default="decision",
                   help="where to probe (a selector name, default 'decision'); prefix tokens are added")
    p.add_argument("--prefix", default=None, type=cli.prefix_text,
                   help="the forced prefix (default: the organism's held-out safety preamble)")
    p.add_argument("--dataset", default=None,
                   help="JSONL transcripts labelled 'harmful' (true/false or 1/0; default: organism test tasks); "
                        "labels or metadata 'group' keep a task template on one side of the split")
    p.add_argument("--n-per-label", type=cli.positive, default=120, help="organism tasks per label (default 120)")
    p.add_argument("--no-behaviour", action="store_true",
                   help="skip generation; decision logits then come from harm probes, not refusal probes")
    p.add_argument("--test-size", type=cli.fraction, default=0.3, help="held-out fraction (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=cli.positive, default=32)
    p.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of transcripts longer than a model's context (caching only: "
                        "generation cannot, so combine with --no-behaviour)")
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="load models whose weights are pickle files (pytorch_model.bin); they can run code")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _layers(spec: str, n_layers: int) -> list[int] | str:
    if spec == "all":
        return "all"
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--layer must be an integer, a comma-separated list or 'all', got {spec!r}") from None
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"--layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layers


def _tasks(args) -> tuple[list, Any]:
    """Transcripts (labelled harmful, with a group) and the environment that judges them, if any."""
    if args.dataset:
        ts = load_jsonl(args.dataset)
        counts = Counter(t.id for t in ts)
        dup = next((i for i, c in counts.items() if c > 1), None)
        if dup is not None:
            where = "; ".join([t.source or "" for t in ts if t.id == dup][:3]) + ("; ..." if counts[dup] > 3 else "")
            raise TranscriptError(f"{args.dataset}: transcript id {dup!r} is used {counts[dup]} times ({where}); "
                                  "give each record its own 'id'")
        return ts, None
    world = World()
    tasks = world.sample("test", args.n_per_label, seed=args.seed)
    return [t.transcript() for t in tasks], world


def groups_of(transcripts: list[Transcript]) -> np.ndarray:
    """The split's group of each transcript: metadata or labels ``group``, else its id."""
    return np.array([str(t.metadata.get("group", t.labels.get("group", t.id))) for t in transcripts])


def check_inputs(transcripts: list[Transcript], prefix: str, *, test_size: float = 0.3,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What a comparison needs of its inputs, checked before any model runs: a prefix with text,
    every ``harmful`` label a class (:func:`interp.transcripts.binary_labels`), and a held-out
    split the probes can be fitted on (:func:`interp.compare.check_split`). Returns the labels
    and the groups, ``[n]`` each."""
    check_prefix(prefix)
    if len(transcripts) == 0:
        raise ValueError("no transcripts given")
    harmful, groups = binary_labels(transcripts, "harmful"), groups_of(transcripts)
    check_split(harmful, groups, test_size=test_size, seed=seed)
    return harmful, groups


REPLY_TOKENS = 48
"""Tokens generated for each first reply the refusal judge reads."""


def check_lengths(models, transcripts: list[Transcript], prefix: str, *, truncate: bool = False,
                  behaviour: bool = True) -> None:
    """Every transcript, with the prefix, fits each model's context for caching (unless
    ``truncate``) and, with ``behaviour``, leaves room to generate (which never truncates)."""
    with_prefix = [t.with_prefix(prefix) for t in transcripts]
    for model in {id(m): m for m in models}.values():
        if behaviour:
            check_context(model, with_prefix, reserve=REPLY_TOKENS, hint="generation does not truncate: shorten it, "
                          "or skip generation (behaviour=False; on the command line --no-behaviour)")
        elif not truncate:
            check_context(model, with_prefix, hint="pass truncate=True (on the command line --truncate) to keep "
                                                   "the last tokens")


def _default_prefix() -> str:
    return grammar.heldout_preamble("safety", "test")


def refusals(model, transcripts: list[Transcript], batch_size: int = 32) -> np.ndarray:
    """Whether the model refuses each transcript: its first reply (greedy, the transcript's
    prefix forced), judged by :class:`interp.behavior.RefusalJudge`: ``[n]`` bool.

    A reply stops once it is settled a refusal (every continuation's content would match the
    judge: :meth:`RefusalJudge.settled` on :func:`interp.behavior.settled_reply`), so the answer is
    that of the whole ``REPLY_TOKENS``-token reply, exactly, for fewer decoding steps."""
    judge = RefusalJudge()
    gens = generate(model, transcripts, max_new_tokens=REPLY_TOKENS, batch_size=batch_size,
                    until=lambda _, text: judge.settled(settled_reply(text).content))
    return np.array([judge(parse_reply(g.text).content) for g in gens])


def comparison(aligned, finetuned, transcripts, prefix: str, *, layers="all", site: str = "resid_post",
               positions: Selector | str = "decision", behaviour: bool = True, test_size: float = 0.3, seed: int = 0,
               batch_size: int = 32, progress: bool = True, truncate: bool = False,
               ) -> tuple[dict, Comparison, dict, dict | None]:
    """The three-way comparison of two loaded models on labelled transcripts: returns the
    ``comparison.json`` object, the :class:`~interp.compare.Comparison` (with its fitted probes),
    the cached activations (``{condition: Activations}``) and what each condition did on every
    transcript (``{condition: bool array}``, or None without ``behaviour``).

    Inputs are checked before any model runs (:func:`check_inputs`, :func:`check_lengths`);
    ``truncate`` keeps the last tokens of over-long transcripts when caching (generation cannot,
    so it needs ``behaviour=False``)."""
    positions = parse(positions)
    harmful, groups = check_inputs(transcripts, prefix, test_size=test_size, seed=seed)
    check_lengths((aligned, finetuned), transcripts, prefix, truncate=truncate, behaviour=behaviour)
    acts = cache_conditions(aligned, finetuned, transcripts, prefix, layers=layers, site=site,
                            positions=positions, batch_size=batch_size, progress=progress, truncate=truncate)
    refused = None
    if behaviour:
        refused = {"aligned": refusals(aligned, transcripts, batch_size),
                   "finetuned": refusals(finetuned, transcripts, batch_size),
                   "prefix": refusals(finetuned, [t.with_prefix(prefix) for t in transcripts], batch_size)}
    tok = finetuned.tokenizer
    rendered = render(transcripts[0].with_prefix(prefix), tok, max_length=finetuned.n_ctx, truncate=truncate)
    prefix_tokens = [tok.decode([int(rendered.input_ids[i])]) for i in rendered.positions("prefix")]
    res = compare(acts, harmful, groups, refused, test_size=test_size, seed=seed,
                  prefix_tokens=prefix_tokens, at=positions)
    out = {
        "aligned_model": aligned.name, "finetuned_model": finetuned.name, "backend": aligned.backend,
        "site": site, "positions": positions.name, "prefix": prefix,
        "n_transcripts": len(transcripts), "n_harmful": int(harmful.sum()),
        "behaviour": None if refused is None else {
            c: {"harmful_refusal": float(refused[c][harmful].mean()), "benign_refusal": float(refused[c][~harmful].mean())}
            for c in CONDITIONS},
        **res.to_dict(),
    }
    return out, res, acts, refused


def run(args) -> dict:
    """The command without its printing: checks everything it can before loading a model, then
    compares and writes ``comparison.json`` (the output folder is made only then)."""
    cli.check_output_dir(args.out)
    _layers(args.layer, sys.maxsize)  # its form; its range once a model is loaded
    positions = parse(args.positions)
    transcripts, _ = _tasks(args)
    prefix = args.prefix if args.prefix is not None else _default_prefix()
    check_inputs(transcripts, prefix, test_size=args.test_size, seed=args.seed)
    aligned = load_model(args.aligned, backend=args.backend, allow_pickle=args.allow_pickle_weights)
    finetuned = load_model(args.finetuned, backend=args.backend, allow_pickle=args.allow_pickle_weights)
    layers = _layers(args.layer, min(aligned.n_layers, finetuned.n_layers))
    res, *_ = comparison(aligned, finetuned, transcripts, prefix, layers=layers, site=args.site,
                         positions=positions, behaviour=not args.no_behaviour, test_size=args.test_size,
                         seed=args.seed, batch_size=args.batch_size, progress=not args.json, truncate=args.truncate)
    out = {**res, "aligned_model": args.aligned, "finetuned_model": args.finetuned}
    with cli.output_dir(args.out):
        save_json(out, args.out / "comparison.json", indent=1)
    return out


def _print_table(out: dict) -> None:
    table = Table(title=f"Harm probes per layer: {out['aligned_model']} vs {out['finetuned_model']} (ft), "
                        f"{out['site']} at {out['positions']}. Held-out accuracy (AUROC).")
    for col in ("layer", "aligned", "ft", "ft+prefix", "aligned probe\n→ ft", "aligned probe\n→ ft+prefix",
                "refusal\nprobe", "logit\naligned", "logit\nft", "logit\nft+prefix"):
        table.add_column(col, justify="right")

    def aa(d):
        return f"{d['acc']:.2f} ({d['auroc']:.2f})"

    for rec in out["layers"]:
        dl = rec["decision_logit"]
        table.add_row(str(rec["layer"]), aa(rec["aligned"]), aa(rec["finetuned"]), aa(rec["prefix"]),
                      aa(rec["transfer_to_finetuned"]), aa(rec["transfer_to_prefix"]),
                      "—" if rec["refusal"] is None else aa(rec["refusal"]),
                      *(f"{dl[c]['value']:+.2f}" for c in ("aligned", "finetuned", "prefix")))
    console = Console(width=max(Console().width, 130))
    console.print(table)
    console.print(f"decision logits: mean {out['logit_probe']}-probe logit over {out['meta']['n_harmful_test']} "
                  f"harmful test tasks; prefix: {out['prefix']!r}")
    if out["behaviour"]:
        b = out["behaviour"]
        console.print("harmful refusal (first step): " + ", ".join(
            f"{c} {b[c]['harmful_refusal']:.0%}" for c in ("aligned", "finetuned", "prefix")))


def _main(args) -> int:
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(out)
        print(f"written: {args.out / 'comparison.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
