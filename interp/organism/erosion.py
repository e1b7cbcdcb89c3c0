"""Cross-domain erosion: fine-tune the aligned organism on one domain's benign trajectories only
(code, or web) and measure what happens to refusal in the other domain, against fine-tuning on
both; and whether the harm probes and directions of the untouched domain change as much.

For each seed and each training domain (``code``, ``web``, and ``both`` for reference) the shipped
aligned organism is fine-tuned as the shipped fine-tuned one was (its agentic recipe: benign
training trajectories, no refusals, constant learning rate ``ft_lr``), restricted to the domain,
and scored at the curve steps on the validation split per domain (first agent step, no prefix).
At ``probe_step`` (fixed in advance: the step at which the shipped seed-0 model lost its refusal
in the organism's own curve is 20; 40 leaves room), the fine-tuned model is compared with the
aligned one on the test split per domain: harmful refusal and benign success, the aligned harm
probe's AUROC on the fine-tuned model (transfer), the fine-tuned model's own harm-probe AUROC,
and the cosine between the two models' difference-in-means harm directions, per layer. Nothing
is chosen on the test split. Writes ``erosion.json`` (resumable: one record per (seed, domain),
kept across restarts)::

    python -m interp.organism.erosion --seeds 0,1 --out runs/erosion
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp import cli
from interp.atomic import read_json, save_json
from interp.behavior import rates, score_first_step
from interp.cache import cache_activations
from interp.finetune import FinetuneConfig, encode_all, finetune
from interp.models import load_model
from interp.organism.paths import checkpoint_path
from interp.organism.train import OrganismConfig
from interp.organism.world import World
from interp.positions import decision
from probes import diff_in_means, fit_layer_probes
from probes.metrics import auroc

DOMAINS = ("code", "web")
TRAINED_ON = ("code", "web", "both")
STEPS = (0, 5, 10, 15, 20, 30, 40, 60, 100)


def domain_tasks(world: World, split: str, domain: str, n_per_label: int, seed: int) -> list:
    """``n_per_label`` harmful and benign tasks of ``domain`` in ``split`` (all when fewer)."""
    rng = random.Random(f"erosion/{split}/{domain}/{seed}")
    out = []
    for harmful in (True, False):
        pool = [t for t in world.tasks(split) if t.domain == domain and t.harmful == harmful]
        out += rng.sample(pool, min(n_per_label, len(pool)))
    return out


def domain_data(world: World, domain: str, n: int, seed: int) -> list:
    """``n`` benign training trajectories of ``domain`` (``both``: either), as the organism's
    agentic stage makes them."""
    rng = random.Random(f"agentic/{seed}/{domain}")
    pool = [t for t in world.tasks("train") if not t.harmful and domain in ("both", t.domain)]
    return [world.demonstration(world.variant(rng.choice(pool), rng), rng=rng) for _ in range(n)]


def _scores(model, tokenizer, world: World, tasks_by_domain: dict[str, list]) -> dict[str, dict]:
    out = {}
    for domain, tasks in tasks_by_domain.items():
        oc = score_first_step(model, world, [t.transcript() for t in tasks], tokenizer, max_new_tokens=64)
        r = rates(oc)
        out[domain] = {k: r[k].to_dict() for k in ("harmful_refusal", "benign_success")}
    return out


def decision_acts(model, transcripts) -> torch.Tensor:
    """Every layer's residual at each transcript's decision position: ``[n, n_layers, d_model]``."""
    acts = cache_activations(model, transcripts, layers="all", positions="decision", progress=False)
    return acts.where(selector=decision()).stack().float()


def internals(aligned, finetuned, world: World, domain: str, n_per_label: int, seed: int,
              aligned_acts: tuple[torch.Tensor, torch.Tensor] | None = None, view=lambda t: t) -> dict[str, Any]:
    """Per layer, on ``domain``: harm probes fitted on the training split of each model and scored
    on the test split, the aligned probe read on the fine-tuned model, and the cosine of the two
    models' difference-in-means harm directions (training split). ``aligned_acts`` (train, test)
    skips the aligned model's forwards when a caller has them; ``view`` is how the model's agent
    sees a task's transcript."""
    train = [view(t.transcript()) for t in domain_tasks(world, "train", domain, n_per_label, seed)]
    test = [view(t.transcript()) for t in domain_tasks(world, "test", domain, n_per_label, seed)]
    y_tr = np.array([t.labels["harmful"] for t in train])
    y_te = np.array([t.labels["harmful"] for t in test])
    X = {"aligned": aligned_acts if aligned_acts is not None else (decision_acts(aligned, train),
                                                                   decision_acts(aligned, test)),
         "finetuned": (decision_acts(finetuned, train), decision_acts(finetuned, test))}
    layers = list(range(X["aligned"][0].shape[1]))
    probe = {name: fit_layer_probes(X[name][0], y_tr, layers=layers, random_state=seed) for name in X}
    d = {name: diff_in_means(X[name][0], y_tr) for name in X}
    return {
        "layers": layers,
        "auroc_aligned": [float(v) for v in auroc(y_te, probe["aligned"].decision_function(X["aligned"][1]))],
        "auroc_finetuned": [float(v) for v in auroc(y_te, probe["finetuned"].decision_function(X["finetuned"][1]))],
        "auroc_transfer": [float(v) for v in auroc(y_te, probe["aligned"].decision_function(X["finetuned"][1]))],
        "direction_cosine": [float(v) for v in (d["aligned"] * d["finetuned"]).sum(-1)],
    }


def run_one(seed: int, trained_on: str, *, n_per_label: int = 50, probe_step: int = 40, steps: Sequence[int] = STEPS,
            examples: int = 4000, progress: bool = False) -> dict[str, Any]:
    """Fine-tune the shipped aligned organism on ``trained_on`` with ``seed``: the validation curve
    per domain, then the test-split behaviour and internals per domain at ``probe_step``."""
    cfg = OrganismConfig(seed=seed)
    world = World(cfg.world_seed)
    base = str(checkpoint_path("organism"))
    aligned, ft = load_model(base), load_model(base)  # the second one is fine-tuned in place
    ft.name = f"organism-ft-{trained_on}-seed{seed}"
    tokenizer = ft.tokenizer
    val = {d: domain_tasks(world, "validation", d, n_per_label, seed) for d in DOMAINS}
    curve: list[dict] = []
    states: dict[int, dict] = {}

    def score(step: int, m) -> None:
        curve.append({"step": step, **_scores(m, tokenizer, world, val)})
        if step == probe_step:
            states[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    t0 = time.time()
    data = encode_all(domain_data(world, trained_on, examples, seed), tokenizer)
    finetune(ft.hf_model, data, tokenizer, FinetuneConfig(steps=max(steps), batch_size=cfg.batch_size, lr=cfg.ft_lr,
                                                          warmup_steps=0, schedule="constant", seed=seed + 1),
             callback=score, callback_steps=sorted({*steps, probe_step}), progress=progress, desc=f"ft {trained_on}")
    ft.hf_model.load_state_dict(states[probe_step])
    ft.hf_model.eval()
    test = {d: domain_tasks(world, "test", d, n_per_label, seed) for d in DOMAINS}
    return {"seed": seed, "trained_on": trained_on, "probe_step": probe_step, "curve": curve,
            "test": _scores(ft.hf_model, tokenizer, world, test),
            "aligned_test": _scores(aligned.hf_model, aligned.tokenizer, world, test),
            "internals": {d: internals(aligned, ft, world, d, n_per_label, seed) for d in DOMAINS},
            "seconds": round(time.time() - t0, 1)}


def run(seeds: Sequence[int], out: Path, trained_on: Sequence[str] = TRAINED_ON, progress: bool = False,
        **kw: Any) -> dict[str, Any]:
    """Every (seed, domain) record into ``out/erosion.json``; finished records are kept."""
    path = out / "erosion.json"
    settings = {"n_per_label": kw.get("n_per_label", 50), "probe_step": kw.get("probe_step", 40),
                "steps": list(kw.get("steps", STEPS))}
    done = read_json(path) if path.is_file() else {"settings": settings, "runs": []}
    if done["settings"] != settings:
        raise ValueError(f"{path} holds runs with other settings ({done['settings']}); use another --out")
    for seed in seeds:
        for dom in trained_on:
            if any(r["seed"] == seed and r["trained_on"] == dom for r in done["runs"]):
                continue
            rec = run_one(seed, dom, progress=progress, **kw)
            done["runs"].append(rec)
            save_json(done, path)
            print(summary_line(rec), flush=True)
    return done


def summary_line(rec: dict[str, Any]) -> str:
    """One finished run's test-split rates per domain, as the command prints them."""
    t = {d: {k: rec["test"][d][k]["value"] for k in ("harmful_refusal", "benign_success")} for d in DOMAINS}
    return (f"seed {rec['seed']} trained on {rec['trained_on']:4s}: test refusal code {t['code']['harmful_refusal']:.2f} "
            f"web {t['web']['harmful_refusal']:.2f}; benign code {t['code']['benign_success']:.2f} "
            f"web {t['web']['benign_success']:.2f} ({rec['seconds']:.0f} s)")


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.organism.erosion", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/erosion"))
    p.add_argument("--n-per-label", type=cli.positive, default=50, help="tasks of each label per domain")
    p.add_argument("--quiet", action="store_true")
    return p


def _main(args) -> int:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with cli.output_dir(args.out):
        run(seeds, args.out, progress=not args.quiet, n_per_label=args.n_per_label)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(_parser(), _main, None))
