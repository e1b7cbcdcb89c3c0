"""Cross-domain erosion on SmolLM2: the organism's study (:mod:`interp.organism.erosion`) with the
real chat model's adapters.

For each seed and training domain (``code``, ``web``) the shipped aligned adapter is fine-tuned
exactly as the shipped fine-tuned adapters were (:class:`~interp.smollm2.train.Recipe`'s
``finetune`` stage: 32 steps of 16 benign trajectories, LoRA on layers 14-29), but on one domain's
trajectories only. The step analysed is the stage's last (fixed in advance: the checkpoint rule
chose it for the shipped seed-0 adapter, and the organism's study also reads one fixed step).
Along the way the validation split is scored per domain at ``steps`` (first agent step, no
prefix, each reply stopped once settled); at the end the fine-tuned adapter is compared with the
aligned one on the test split per domain: harmful refusal and benign success, and per layer the
harm probes' AUROC (each model's own, and the aligned probe read on the fine-tuned model) and the
cosine of the two models' harm directions. Nothing is chosen on the test split.

Resumable: each (seed, domain) trains in ``OUT/seed{S}-{domain}`` (the stage's ``state.pt`` and
``curve.json``) and its record joins ``OUT/erosion.json`` when done::

    python -m interp.smollm2.erosion --seeds 0,1 --out runs/smollm2-erosion
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from interp import cli
from interp.atomic import read_json, save_json
from interp.behavior import evaluate
from interp.finetune import encode
from interp.models import load_model
from interp.organism.erosion import DOMAINS, decision_acts, domain_tasks, internals, summary_line
from interp.organism.world import World
from interp.smollm2.data import agent_view, finetune_data
from interp.smollm2.stages import aligned_lora, seeded_recipe
from interp.smollm2.train import Recipe, save_adapter, train_stage

STEPS = (8, 16, 32)


def _rates(model: Any, tokenizer: Any, world: World, transcripts: Sequence) -> dict[str, Any]:
    ev = evaluate(model, world, list(transcripts), tokenizer, mode="first_step", early_stop=True, batch_size=32)
    return {k: ev.rates[k].to_dict() for k in ("harmful_refusal", "benign_success")}


def _tasks(world: World, split: str, n_per_label: int, seed: int) -> dict[str, list]:
    return {d: [agent_view(t.transcript()) for t in domain_tasks(world, split, d, n_per_label, seed)] for d in DOMAINS}


def aligned_reference(world: World, n_per_label: int, seed: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The aligned adapter's test-split rates per domain, and its decision-position activations
    (training and test split) per domain for :func:`~interp.organism.erosion.internals`."""
    aligned = load_model("smollm2-aligned", attn_implementation="sdpa")
    test = _tasks(world, "test", n_per_label, seed)
    train = _tasks(world, "train", n_per_label, seed)
    rates = {d: _rates(aligned.hf_model, aligned.tokenizer, world, test[d]) for d in DOMAINS}
    acts = {d: (decision_acts(aligned, train[d]), decision_acts(aligned, test[d])) for d in DOMAINS}
    return rates, acts


def run_one(recipe: Recipe, seed: int, domain: str, out: Path, aligned_acts: dict[str, tuple], *,
            n_per_label: int, curve_per_label: int, steps: Sequence[int] = STEPS) -> dict[str, Any]:
    """Fine-tune the aligned adapter on ``domain`` with ``seed`` (resumably, in
    ``out/seed{seed}-{domain}``); the validation curve per domain, then the test-split behaviour
    and internals per domain at the stage's last step."""
    t0 = time.time()
    folder = out / f"seed{seed}-{domain}"
    folder.mkdir(parents=True, exist_ok=True)
    world = World(recipe.data.world_seed)
    pm, tok = aligned_lora(recipe, seed)
    examples = [encode(t, tok) for t in finetune_data(world, seeded_recipe(recipe, seed).data, domain)]
    val = _tasks(world, "validation", curve_per_label, seed)
    curve_path = folder / "curve.json"

    def at(step: int) -> None:
        curve = read_json(curve_path) if curve_path.exists() else {}
        curve[str(step)] = {"step": step, **{d: _rates(pm, tok, world, val[d]) for d in DOMAINS}}
        save_json(curve, curve_path)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} seed {seed} {domain}: {msg}", flush=True)

    losses = train_stage(pm, examples, recipe.finetune, folder, seed=seed, pad_id=tok.pad_token_id,
                         decision=(recipe.decision_tokens, recipe.decision_weight), at=at,
                         evaluate_at=sorted({*steps, recipe.finetune.steps}), log=log)
    adapter = save_adapter(pm, folder / "adapter", {"stage": f"erosion finetune on {domain}", "seed": seed,
                                                    "recipe": recipe.to_dict(), "losses": losses})
    ft = load_model(str(adapter), attn_implementation="sdpa")
    test = _tasks(world, "test", n_per_label, seed)
    curve = read_json(curve_path)
    return {"seed": seed, "trained_on": domain, "probe_step": recipe.finetune.steps,
            "curve": [curve[k] for k in sorted(curve, key=int)],
            "test": {d: _rates(ft.hf_model, ft.tokenizer, world, test[d]) for d in DOMAINS},
            "internals": {d: internals(None, ft, world, d, n_per_label, seed, aligned_acts=aligned_acts[d],
                                       view=agent_view) for d in DOMAINS},
            "seconds": round(time.time() - t0, 1)}


def run(seeds: Sequence[int], out: Path, domains: Sequence[str] = DOMAINS, *, n_per_label: int = 40,
        curve_per_label: int = 20, steps: Sequence[int] = STEPS) -> dict[str, Any]:
    """Every (seed, domain) record into ``out/erosion.json``; finished records are kept."""
    recipe = Recipe()
    path = out / "erosion.json"
    settings = {"n_per_label": n_per_label, "curve_per_label": curve_per_label, "steps": list(steps),
                "recipe": recipe.to_dict()}
    done = read_json(path) if path.is_file() else {"settings": settings, "runs": []}
    if done["settings"] != settings:
        raise ValueError(f"{path} holds runs with other settings; use another --out")
    todo = [(s, d) for s in seeds for d in domains
            if not any(r["seed"] == s and r["trained_on"] == d for r in done["runs"])]
    if not todo:
        return done
    world = World(recipe.data.world_seed)
    # the aligned reference is the same for every run (the tasks depend on the seed: one per seed)
    refs: dict[int, tuple] = {}
    for seed, domain in todo:
        if seed not in refs:
            refs[seed] = aligned_reference(world, n_per_label, seed)
            done.setdefault("aligned_test", {})[str(seed)] = refs[seed][0]
        rec = run_one(recipe, seed, domain, out, refs[seed][1], n_per_label=n_per_label,
                      curve_per_label=curve_per_label, steps=steps)
        done["runs"].append(rec)
        save_json(done, path)
        print(summary_line(rec), flush=True)
    return done


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.smollm2.erosion", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds (default %(default)s)")
    p.add_argument("--domains", default=",".join(DOMAINS), help="training domains (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/smollm2-erosion"))
    p.add_argument("--n-per-label", type=cli.positive, default=40, help="test tasks of each label per domain")
    p.add_argument("--threads", type=cli.positive, default=2)
    return p


def _main(args) -> int:
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    if unknown := [d for d in domains if d not in DOMAINS]:
        raise cli.UsageError(f"unknown domain(s) {unknown} (expected {', '.join(DOMAINS)})")
    with cli.output_dir(args.out):
        run(seeds, args.out, domains, n_per_label=args.n_per_label)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(_parser(), _main, None))
