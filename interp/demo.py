"""``python -m interp.demo`` (``make demo``): the main job on the built-in model organism.

Stages, each writing into ``--out`` (default ``runs/demo``) and skipped when its outputs exist,
so a killed run started again resumes (``--fresh`` starts over):

1. **organism**: the shipped aligned and fine-tuned checkpoints (trained here if absent) and
   their refusal-versus-fine-tuning-steps curves -> ``results/curve*.json``;
2. **ping**: PING on the validation split, the probe-guided search, steering, and the test-split
   table of the models, PING and every baseline (:mod:`interp.ping.__main__`), and the guard
   comparison (:mod:`interp.ping.guard_study`) -> ``results/behaviour.json``,
   ``ping_history.jsonl``, ``ping_guided_history.jsonl``, ``steering.json``, ``ping.json``,
   ``guards.json``;
3. **comparison**: decision-position probes per layer for the aligned model, the fine-tuned
   model and the fine-tuned model with the PING prefix (:func:`interp.probe.comparison`), their
   PCA, and the refusal probe's logit on every token -> ``comparison.json``, ``pca.json``,
   ``token_logits.json``;
4. **attribution**: which segments write the refusal signal (exact mean-ablation, the gradient
   and integrated-gradient estimates, their rank agreement) and the placement study (the harmful
   request in the user turn, a tool observation or the system prompt) -> ``attribution.json``;
5. **figures**: F1-F9 into ``figures/`` (:mod:`interp.figures`).

It ends with a table of the headline numbers.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rich.console import Console
from rich.table import Table

from interp import cli
from interp.atomic import read_json, save_json
from interp.attribution import ProbeLogit, kind_effects, mean_residual, rank_agreement, segment_attributions
from interp.cache import cache_activations
from interp.compare import pca_projection, token_logits
from interp.figures import write_figures
from interp.models import load_model
from interp.organism import CHECKPOINT_DIR, World, checkpoint_path
from interp.organism.placement import PLACEMENTS, placed
from interp.organism.train import OrganismConfig, train
from interp.ping.__main__ import PingConfig
from interp.ping.__main__ import run as run_ping_study
from interp.positions import decision
from interp.probe import comparison, refusals
from interp.transcripts import binary_labels
from probes import fit_layer_probes

STAGES = ("organism", "ping", "comparison", "attribution", "figures")
PING_FILES = ("behaviour.json", "ping_history.jsonl", "ping_guided_history.jsonl", "steering.json", "ping.json",
              "guards.json")
OUTPUTS = {"organism": ("curve.json",), "ping": PING_FILES,
           "comparison": ("comparison.json", "pca.json", "token_logits.json"),
           "attribution": ("attribution.json",), "figures": ()}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Stages


def stage_organism(a, results: Path) -> None:

    root = Path(a.checkpoints) if a.checkpoints else CHECKPOINT_DIR
    if not (root / "organism-finetuned" / "config.json").exists():
        _log(f"no organism checkpoints in {root}; training them (about 10 minutes)")
        train(OrganismConfig(seed=0), root, progress=not a.no_progress)
    for curve in sorted(root.glob("curve*.json")):
        shutil.copyfile(curve, results / curve.name)


def stage_ping(a, results: Path) -> None:
    summary = run_ping_study(PingConfig(subject="organism", out=a.out / "ping", checkpoints=a.checkpoints,
                                        rounds=a.rounds, seed=a.seed, guards=True, progress=not a.no_progress))
    _log(f"PING prefix {summary['best_prefix']!r} (validation score {summary['validation']['score']:.3f})")
    for name in PING_FILES:
        shutil.copyfile(a.out / "ping" / name, results / name)


def _models(a):
    root = Path(a.checkpoints) if a.checkpoints else None
    return (load_model(str(checkpoint_path("organism", root)), backend=a.backend),
            load_model(str(checkpoint_path("organism-finetuned", root)), backend=a.backend))


def _ping_prefix(results: Path) -> str:
    return read_json(results / "ping.json")["best_prefix"]


def stage_comparison(a, results: Path) -> None:
    aligned, finetuned = _models(a)
    prefix = _ping_prefix(results)
    transcripts = [t.transcript() for t in World().sample("test", a.n_per_label, seed=a.seed)]
    out, res, acts, refused = comparison(aligned, finetuned, transcripts, prefix, seed=a.seed,
                                         progress=not a.no_progress)
    save_json({**out, "aligned_model": "organism", "finetuned_model": "organism-finetuned"},
               results / "comparison.json")
    layer = _readout_layer(out)
    harmful = binary_labels(transcripts, "harmful")
    save_json(pca_projection(acts, layer, harmful, refused), results / "pca.json")
    probe = res.probes["logit_prefix"]
    i = list(probe.layers_).index(layer)
    coef, intercept = probe.coef_[i], float(probe.intercept_[i])
    test_harmful = [transcripts[k] for k in res.split[1] if harmful[k]]
    save_json({"layer": layer, "site": out["site"], "probe": out["logit_probe"], "prefix": prefix,
                "conditions": {
                    "finetuned": token_logits(finetuned, test_harmful, coef, intercept, layer),
                    "prefix": token_logits(finetuned, [t.with_prefix(prefix) for t in test_harmful], coef,
                                           intercept, layer)}},
               results / "token_logits.json")


def _readout_layer(comparison: dict) -> int:
    """The layer whose refusal probe is most accurate on held-out rows (the later one on ties)."""
    recs = [r for r in comparison["layers"] if r.get("refusal")]
    if not recs:
        return comparison["layers"][-1]["layer"]
    return max(recs, key=lambda r: (round(r["refusal"]["acc"], 3), r["layer"]))["layer"]


def stage_attribution(a, results: Path) -> None:
    aligned, finetuned = _models(a)
    prefix = _ping_prefix(results)
    comp = read_json(results / "comparison.json")
    layer = _readout_layer(comp)
    world = World()

    def refusal_probe(model, ts, refused) -> ProbeLogit:
        acts = cache_activations(model, ts, layers=[layer], positions="decision", progress=False)
        X = acts.where(selector=decision()).stack().float()
        probe = fit_layer_probes(X, refused, layers=[layer])
        return ProbeLogit.from_probes(probe, layer)

    # a refusal probe per model, fitted on training-split tasks (the fine-tuned one with and without PING)
    train_ts = [t.transcript() for t in world.sample("train", a.n_per_label, seed=a.seed)]
    ft_train = train_ts + [t.with_prefix(prefix) for t in train_ts]
    metrics = {"aligned": refusal_probe(aligned, train_ts, refusals(aligned, train_ts)),
               "finetuned": refusal_probe(finetuned, ft_train,
                                          np.concatenate([refusals(finetuned, train_ts),
                                                          refusals(finetuned, [t.with_prefix(prefix) for t in train_ts])]))}
    reference = [t.transcript() for t in world.sample("validation", a.n_per_label, seed=a.seed)]
    baselines = {"aligned": mean_residual(aligned, reference, progress=False),
                 "finetuned": mean_residual(finetuned, reference + [t.with_prefix(prefix) for t in reference],
                                            progress=False)}
    tasks = world.sample("test", a.attribution_n, seed=a.seed + 1)
    out: dict[str, Any] = {"model": "finetuned", "prefix": prefix, "layer": layer}
    exact, estimates = [], {"grad": [], "ig": []}
    for label, want in (("harmful", True), ("benign", False)):
        ts = [t.transcript().with_prefix(prefix) for t in tasks if t.harmful == want]
        kw = dict(baseline=baselines["finetuned"], merge=("template",), progress=not a.no_progress)
        e = segment_attributions(finetuned, ts, metrics["finetuned"], method="exact", **kw)
        out[label] = kind_effects(e).to_dict()
        exact += e
        for method in ("grad", "ig"):
            fast = segment_attributions(finetuned, ts, metrics["finetuned"], method=method, **kw)
            out[f"{label}_{method}"] = kind_effects(fast).to_dict()
            estimates[method] += fast
    out["metric"], out["method"] = out["harmful"]["metric"], "exact"
    out["agreement"] = rank_agreement(exact, estimates["grad"]).to_dict()
    out["agreement_ig"] = rank_agreement(exact, estimates["ig"]).to_dict()

    conditions = []
    harmful_tasks = [t for t in tasks if t.harmful]
    for placement in PLACEMENTS:
        ts = [placed(t, placement) for t in harmful_tasks]
        for model_name, model, p in (("aligned", aligned, None), ("finetuned", finetuned, None),
                                     ("prefix", finetuned, prefix)):
            run = [t.with_prefix(p) for t in ts]
            metric = metrics["aligned" if model_name == "aligned" else "finetuned"]
            eff = kind_effects(segment_attributions(model, run, metric, baseline=baselines[
                "aligned" if model_name == "aligned" else "finetuned"], method="exact", layers=[0],
                merge=("template",), progress=False))
            kinds = [k for k in eff.kinds if k not in ("template", "prefix")]
            conditions.append({"placement": placement, "model": model_name, "kinds": kinds,
                               "effect": [float(eff.mean[eff.kinds.index(k), 0]) for k in kinds],
                               "harmful_refusal": float(refusals(model, run).mean()), "n": len(ts)})
    out["placement"] = {"layer": 0, "conditions": conditions,
                        "note": "effect of mean-ablating each segment kind from the embeddings on (layer 0)"}
    save_json(out, results / "attribution.json")


def stage_figures(a, results: Path) -> None:
    done = write_figures(results, a.figures, png=not a.no_png)
    for note in done.notes:
        _log(note)
    if done.failed:
        raise RuntimeError(f"figures failed: {', '.join(done.failed)}")


RUNNERS = {"organism": stage_organism, "ping": stage_ping, "comparison": stage_comparison,
           "attribution": stage_attribution, "figures": stage_figures}


# --------------------------------------------------------------------------------------------
# Summary


def summary(results: Path) -> list[tuple[str, str]]:
    """The headline numbers, as (what, value) rows, from the stored results."""
    def iv(d):
        return f"{d['value']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"

    rows = []
    ping = read_json(results / "ping.json")
    b = {c["key"]: c for c in read_json(results / "behaviour.json")["conditions"]}
    for key, what in (("aligned", "aligned"), ("finetuned", "fine-tuned"), ("ping", "fine-tuned + PING")):
        if key in b:
            rows.append((f"{what}: harmful refusal / benign success",
                         f"{iv(b[key]['harmful_refusal'])} / {iv(b[key]['benign_success'])}"))
    rows.append(("PING prefix", repr(ping["best_prefix"])))
    g = ping["probe_guided"]
    rows.append(("probe-guided PING: generations to the plain run's best",
                 f"{g['generations_to_match']} (plain: {g['plain_generations_to_best']})"))
    comp = read_json(results / "comparison.json")
    last = comp["layers"][-1]
    rows.append((f"harm probe accuracy, layer {last['layer']}: aligned / fine-tuned / + PING / aligned probe on ft",
                 " / ".join(f"{last[k]['acc']:.2f}" for k in ("aligned", "finetuned", "prefix", "transfer_to_finetuned"))))
    layer = _readout_layer(comp)
    dl = next(r for r in comp["layers"] if r["layer"] == layer)["decision_logit"]
    rows.append((f"{comp['logit_probe']} probe logit at the decision position, layer {layer} (harmful tasks)",
                 " / ".join(f"{c} {dl[c]['value']:+.2f}" for c in ("aligned", "finetuned", "prefix"))))
    att = read_json(results / "attribution.json")
    rows.append(("attribution: rank agreement with exact patching (Spearman, pooled), gradient / integrated gradients",
                 f"{att['agreement']['pooled']:.2f} / {att['agreement_ig']['pooled']:.2f}"))
    return rows


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (default %(default)s)")
    p.add_argument("--figures", type=Path, default=Path("figures"), help="figure folder (default %(default)s)")
    p.add_argument("--checkpoints", help="an organism training output folder (default: the shipped checkpoints)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run (default all)")
    p.add_argument("--fresh", action="store_true", help="redo the chosen stages even when their outputs exist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=cli.positive, default=20, help="PING rounds (paper: 20)")
    p.add_argument("--n-per-label", type=cli.positive, default=60, help="tasks of each label for the probes")
    p.add_argument("--attribution-n", type=cli.positive, default=12, help="test tasks of each label for attribution")
    p.add_argument("--backend", default="hf", choices=("hf", "bridge", "nnsight"))
    p.add_argument("--threads", type=cli.positive, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-png", action="store_true", help="figures as HTML only")
    p.add_argument("--no-progress", action="store_true")
    return p


def _run(a) -> int:
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise cli.UsageError(f"unknown stage(s) {unknown} (expected {', '.join(STAGES)})")
    cli.check_output_dir(a.out)
    cli.check_output_dir(a.figures, "--figures")
    if a.checkpoints and not Path(a.checkpoints).is_dir() and "organism" not in stages:
        raise FileNotFoundError(f"--checkpoints {a.checkpoints}: no such folder")
    if a.threads:
        torch.set_num_threads(a.threads)
    results = a.out / "results"
    if a.fresh:
        if "ping" in stages:
            shutil.rmtree(a.out / "ping", ignore_errors=True)
        for s in stages:
            for name in OUTPUTS[s]:
                (results / name).unlink(missing_ok=True)
    with cli.output_dir(results):
        _stages(a, stages, results)
    return 0


def _stages(a, stages: list[str], results: Path) -> None:
    t0 = time.time()
    for s in stages:
        if OUTPUTS[s] and all((results / n).exists() for n in OUTPUTS[s]):
            _log(f"{s}: done already ({', '.join(OUTPUTS[s])} in {results}); --fresh redoes it")
            continue
        t = time.time()
        _log(f"{s} ...")
        RUNNERS[s](a, results)
        _log(f"{s}: {time.time() - t:.0f} s")
    table = Table(title=f"agent-refusal-interp demo ({time.time() - t0:.0f} s); results in {results}, "
                        f"figures in {a.figures}/")
    table.add_column("what")
    table.add_column("value", justify="right")
    if all((results / n).exists() for n in ("ping.json", "behaviour.json", "comparison.json", "attribution.json")):
        for row in summary(results):
            table.add_row(*row)
        Console(width=max(Console().width, 120)).print(table)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
