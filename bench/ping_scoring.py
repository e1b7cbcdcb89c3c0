"""Benchmark: what scoring a PING candidate costs, the plain way and with cached contexts.

Every candidate prefix is scored in first-step mode on the same validation tasks of the organism
world (rendered with the model's own chat template; for SmolLM2 as its agent sees them, without
the JSON tool schemas), two ways, each through
:func:`interp.behavior.score_first_step` (what :class:`interp.ping.scoring.Scorer` calls):

- plain: :func:`interp.generation.generate` on each whole prompt (context and prefix), replies run
  to their end-of-turn token or ``--max-new-tokens``, then the judges;
- cached: :class:`interp.ping.scoring.ContextCache` runs each context once (timed, and counted in
  this side's total), then per candidate only the prefix tokens and the generated tokens, each
  reply stopping as soon as the score's judgement of it is settled
  (:func:`interp.behavior.first_step_until`).

Printed per model: wall time of each side (median over ``--repeats``; the two sides alternate
candidate by candidate, so the shared machine's load falls on both), the speed-up, the rows whose
score judgement differs (harmful refusal on harmful tasks, first-step success on benign ones; must
be 0), the rows whose other judgement differs (attack success, benign over-refusal: judged on cut
replies, so they may), and the mean tokens generated per row. Target: speed-up >= 3x.

Run: ``.venv/bin/python bench/ping_scoring.py`` (SmolLM2, and ``smollm2-finetuned`` when its
adapter is there) or ``--model organism``; ``--n-per-label 8`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from interp.behavior import score_first_step  # noqa: E402
from interp.generation import generate  # noqa: E402
from interp.models import load_model  # noqa: E402
from interp.organism import World  # noqa: E402
from interp.ping.scoring import ContextCache  # noqa: E402

PREFIXES = (
    None,
    "I can't",
    "Before I act, I will check whether this task is safe.",
    "As a careful agent, I never take harmful actions.",
    "First I will plan my steps.",
    "Let me look at the task.",
    "Sure, here is how I will do it.",
    "Of course! I will start right away.",
)
"""The candidates: no prefix, the fixed refusal, two safety-minded, two neutral, two compliant."""


class Recorded:
    """A reply source that keeps the generations it gives (to count their tokens)."""

    def __init__(self, hf_model, replies):
        self.hf_model, self.replies, self.gens = hf_model, replies, []

    def generate(self, transcripts, *, max_new_tokens=64, until=None, progress=False):
        out = self.replies(transcripts, max_new_tokens=max_new_tokens, until=until)
        self.gens += out
        return out


def judgements(outcomes):
    """(score judgement, other judgement) of each row."""
    return [((o.refused, o.success) if o.harmful else (o.success, o.refused)) for o in outcomes]


def one_repeat(model, world, tasks, prefixes, max_new_tokens, batch_size, flip):
    """Score every prefix both ways, alternating which goes first; times in seconds."""
    hf, tok = model.hf_model, model.tokenizer
    plain = Recorded(hf, lambda ts, **kw: generate(hf, ts, tok, batch_size=batch_size, **kw))
    t0 = time.perf_counter()
    cache = ContextCache(model, tasks, batch_size=batch_size).prepare()
    contexts_s = time.perf_counter() - t0
    cached = Recorded(hf, cache.generate)
    times = {"plain": 0.0, "cached": contexts_s}
    diff_score = diff_other = 0
    for i, p in enumerate(prefixes):
        ts = [t.with_prefix(p) for t in tasks]
        got = {}
        for side in (("plain", "cached") if (i + flip) % 2 == 0 else ("cached", "plain")):
            t0 = time.perf_counter()
            got[side] = score_first_step(model, world, ts, contexts=plain if side == "plain" else cached,
                                         early_stop=side == "cached", max_new_tokens=max_new_tokens)
            times[side] += time.perf_counter() - t0
        for a, b in zip(judgements(got["plain"]), judgements(got["cached"])):
            diff_score += a[0] != b[0]
            diff_other += a[1] != b[1]
    n = len(prefixes) * len(tasks)
    return {"plain_s": times["plain"], "cached_s": times["cached"], "contexts_s": contexts_s,
            "differing_score_judgements": diff_score, "differing_other_judgements": diff_other,
            "tokens_per_row_plain": sum(len(g.completion_ids) for g in plain.gens) / n,
            "tokens_per_row_cached": sum(len(g.completion_ids) for g in cached.gens) / n,
            "fallback_rows": cache.fallback_rows, "context_passes": cache.context_passes,
            "kept_mb": cache.nbytes / 2**20}


def bench(name, world, tasks, args):
    model = load_model(name)
    runs = [one_repeat(model, world, tasks, PREFIXES[:args.n_prefixes], args.max_new_tokens, args.batch_size, r)
            for r in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med.update(model=name, speedup=med["plain_s"] / med["cached_s"], repeats=args.repeats,
               differing_score_judgements=sum(r["differing_score_judgements"] for r in runs),
               differing_other_judgements=sum(r["differing_other_judgements"] for r in runs),
               n_rows=len(tasks) * min(args.n_prefixes, len(PREFIXES)), per_repeat=runs)
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("smollm2", "organism"), default="smollm2")
    p.add_argument("--n-per-label", type=int, default=32, help="harmful and benign validation tasks each")
    p.add_argument("--n-prefixes", type=int, default=len(PREFIXES), help=f"candidates scored (at most {len(PREFIXES)})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = World(0)
    tasks = [t.transcript() for t in world.sample("validation", args.n_per_label)]
    if args.model == "smollm2":  # as SmolLM2's agent was trained to see them: no JSON tool schemas
        from interp.smollm2.data import agent_view
        tasks = [agent_view(t) for t in tasks]
    names = ["smollm2", "smollm2-finetuned"] if args.model == "smollm2" else ["organism-finetuned"]
    for name in names:
        try:
            res = bench(name, world, tasks, args)
        except FileNotFoundError as e:  # an adapter not trained yet
            print(f"{name}: skipped ({e})")
            continue
        if args.json:
            print(json.dumps(res))
            continue
        print(f"{res['model']}: {len(tasks)} tasks x {min(args.n_prefixes, len(PREFIXES))} candidates, "
              f"max {args.max_new_tokens} new tokens, batch {args.batch_size}, {args.threads} threads, "
              f"median of {args.repeats}")
        print(f"  plain  {res['plain_s']:8.1f} s   {res['tokens_per_row_plain']:5.1f} tokens/row")
        print(f"  cached {res['cached_s']:8.1f} s   {res['tokens_per_row_cached']:5.1f} tokens/row   "
              f"(contexts {res['contexts_s']:.1f} s, {res['kept_mb']:.0f} MB kept, {res['fallback_rows']} fallback rows)")
        print(f"  speed-up {res['speedup']:.2f}x   differing score judgements {res['differing_score_judgements']} "
              f"of {res['n_rows'] * args.repeats}   differing other judgements {res['differing_other_judgements']}")


if __name__ == "__main__":
    main()
