"""``python -m interp.demo`` (``make demo``): the main job on the built-in models, the organism and SmolLM2.

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
   ``token_logits.json``, and the refusal probes at the readout layer -> ``readout.json``;
4. **attribution**: which segments write the refusal signal, read by the comparison's refusal
   probes (exact mean-ablation, the gradient and integrated-gradient estimates, their rank
   agreement) and the placement study (the harmful request in the user turn, a tool observation
   or the system prompt) -> ``attribution.json``;
5. **figures**: F1-F10 into ``figures/`` (:mod:`interp.figures`; F10 from the committed
   interaction study of the distributed-harm organism, ``docs/research/distributed``, made by
   ``python -m interp.organism.variant interactions``);
6. **smollm2**: stages 3 and 4 again on SmolLM2-135M-Instruct (its aligned and fine-tuned adapters)
   with the prefix of the committed SmolLM2 PING study (``docs/research/smollm2-ping``; a fresh
   study takes about an hour and a half), its figures into ``figures/smollm2/`` (F2 from the
   shipped fine-tuned adapters' validation curves).

It ends with a table of the headline numbers.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rich.console import Console
from rich.table import Table

from interp import cli
from interp.atomic import read_json, save_json
from interp.attribution import ProbeLogit, kind_effects, mean_residual, rank_agreement, segment_attributions
from interp.compare import pca_projection, token_logits
from interp.figures import write_figures
from interp.models import load_model
from interp.organism import CHECKPOINT_DIR, World, checkpoint_path
from interp.organism.placement import PLACEMENTS, placed
from interp.organism.train import OrganismConfig, train
from interp.ping.__main__ import PingConfig
from interp.ping.__main__ import run as run_ping_study
from interp.probe import comparison, refusals
from interp.transcripts import Transcript, binary_labels

STAGES = ("organism", "ping", "comparison", "attribution", "figures", "smollm2")
PING_FILES = ("behaviour.json", "ping_history.jsonl", "ping_guided_history.jsonl", "steering.json", "ping.json",
              "guards.json")
OUTPUTS = {"organism": ("curve.json",), "ping": PING_FILES,
           "comparison": ("comparison.json", "pca.json", "token_logits.json", "readout.json"),
           "attribution": ("attribution.json",), "figures": (),
           "smollm2": tuple(f"smollm2/{n}" for n in ("comparison.json", "pca.json", "token_logits.json",
                                                      "readout.json", "attribution.json"))}
SMOLLM2_STUDY = Path(__file__).resolve().parents[1] / "docs" / "research" / "smollm2-ping"
"""The committed SmolLM2 PING study (about an hour and a half to re-run; its command is in
docs/smollm2.md): the demo takes its prefix and result tables from there."""
INTERACTIONS_STUDY = SMOLLM2_STUDY.parent / "distributed" / "interactions.json"
"""The committed interaction study of ``organism-distributed`` (F10's data)."""


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
    # the organism's forward pass costs less than the Python around it: 256 rows a batch score a
    # candidate's 200 validation tasks in one pass (about a fifth faster than 64)
    summary = run_ping_study(PingConfig(subject="organism", out=a.out / "ping", checkpoints=a.checkpoints,
                                        rounds=a.rounds, seed=a.seed, guards=True, batch_size=256,
                                        progress=not a.no_progress))
    _log(f"PING prefix {summary['best_prefix']!r} (validation score {summary['validation']['score']:.3f})")
    for name in PING_FILES:
        shutil.copyfile(a.out / "ping" / name, results / name)


@dataclass(frozen=True)
class Part:
    """A built-in model pair the demo analyses: its models' names and how to load them, and how
    its agent sees a world task (``view``) with the request placed in one of :data:`PLACEMENTS`."""

    name: str
    model_names: tuple[str, str]
    models: Callable[[], tuple[Any, Any]]
    view: Callable[[Transcript], Transcript] = lambda t: t
    # what a forward pass costs decides these: None takes the command line's
    n_per_label: int | None = None  # tasks of each label for the probes
    attribution_n: int | None = None  # test tasks of each label for attribution
    layer_stride: int = 1  # attribution reads every this-many layers up to the readout layer (and it)
    ig_steps: int = 8  # integrated-gradient midpoints
    reference_n: int | None = None  # validation tasks of each label whose mean residual is the ablation baseline
    batch_size: int = 32  # rows a forward pass (and a generation batch)

    def attribution_layers(self, readout: int) -> list[int] | None:
        return None if self.layer_stride == 1 else sorted({*range(0, readout + 1, self.layer_stride), readout})

    def tasks(self, split: str, n_per_label: int, seed: int, placement: str = "user") -> list[Transcript]:
        chosen = _world().sample(split, n_per_label, seed=seed)
        return [self.view(t.transcript() if placement == "user" else placed(t, placement)) for t in chosen]


@functools.cache
def _world() -> World:
    """The task world (seed 0), built once: building it takes seconds."""
    return World()


def organism_part(a) -> Part:
    root = Path(a.checkpoints) if a.checkpoints else None
    return Part("organism", ("organism", "organism-finetuned"),
                lambda: (load_model(str(checkpoint_path("organism", root)), backend=a.backend),
                         load_model(str(checkpoint_path("organism-finetuned", root)), backend=a.backend)))


def smollm2_part(a) -> Part:
    """SmolLM2: a forward pass costs about 10^4 times the organism's, so fewer tasks, three
    attribution layers, four integrated-gradient midpoints, a mean-ablation baseline from 16 + 16
    tasks, PyTorch's fused attention (not on the bridge, which runs eager attention) and the
    comparison's tasks in one batch (a decoding step reads every weight once, whatever the batch:
    50 s instead of 61-66 s a behaviour pass over 80 tasks) keep the stage to minutes (README)."""
    from interp.smollm2.data import agent_view
    attn = {} if a.backend == "bridge" else {"attn_implementation": "sdpa"}
    return Part("smollm2", ("smollm2-aligned", "smollm2-finetuned"),
                lambda: (load_model("smollm2-aligned", backend=a.backend, **attn),
                         load_model("smollm2-finetuned", backend=a.backend, **attn)), agent_view,
                n_per_label=a.smollm2_n_per_label, attribution_n=4, layer_stride=15, ig_steps=4, reference_n=16,
                batch_size=2 * a.smollm2_n_per_label)


def _ping_prefix(results: Path) -> str:
    return read_json(results / "ping.json")["best_prefix"]


def stage_comparison(a, results: Path, part: Part | None = None) -> None:
    part = part or organism_part(a)
    aligned, finetuned = part.models()
    prefix = _ping_prefix(results)
    transcripts = part.tasks("test", part.n_per_label or a.n_per_label, a.seed)
    out, res, acts, refused = comparison(aligned, finetuned, transcripts, prefix, seed=a.seed,
                                         batch_size=part.batch_size, progress=not a.no_progress)
    save_json({**out, "aligned_model": part.model_names[0], "finetuned_model": part.model_names[1]},
               results / "comparison.json")
    layer = _readout_layer(out)
    harmful = binary_labels(transcripts, "harmful")
    save_json(pca_projection(acts, layer, harmful, refused), results / "pca.json")
    readouts = {m: ProbeLogit.from_probes(res.probes[f"logit_{m}"], layer, out["site"]) for m in ("aligned", "finetuned")}
    save_json({"layer": layer, "site": out["site"], "kind": out["logit_probe"], "n_train": out["n_train"],
               **{m: {"coef": r.coef.tolist(), "intercept": r.intercept} for m, r in readouts.items()}},
              results / "readout.json")
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


def _readouts(results: Path) -> tuple[dict[str, ProbeLogit], str | None]:
    """The comparison stage's refusal probes at its readout layer (``readout.json``), one per model
    (the fine-tuned model's fitted on its rows with and without the prefix), and a note when the
    aligned model's stands in for the fine-tuned model's."""
    r = read_json(results / "readout.json")
    metrics = {m: ProbeLogit(torch.tensor(r[m]["coef"]), r[m]["intercept"], r["layer"], r["site"])
               for m in ("aligned", "finetuned")}
    note = None
    if r["kind"] == "aligned refusal":
        note = ("the aligned model's refusal probe for both models: the fine-tuned model's behaviour on the "
                f"comparison's {r['n_train']} training tasks (with and without the prefix) had one class")
    elif r["kind"] == "harmful":
        note = "harmful-task probes (the comparison ran without behaviour)"
    return metrics, note


def _readout_layer(comparison: dict) -> int:
    """The layer whose refusal probe is most accurate on held-out rows (the later one on ties)."""
    recs = [r for r in comparison["layers"] if r.get("refusal")]
    if not recs:
        return comparison["layers"][-1]["layer"]
    return max(recs, key=lambda r: (round(r["refusal"]["acc"], 3), r["layer"]))["layer"]


def stage_attribution(a, results: Path, part: Part | None = None) -> None:
    part = part or organism_part(a)
    n = part.n_per_label or a.n_per_label
    aligned, finetuned = part.models()
    prefix = _ping_prefix(results)
    metrics, metric_note = _readouts(results)
    if metric_note:
        _log(f"{part.name} attribution: {metric_note}")
    layer = metrics["aligned"].layer
    reference = part.tasks("validation", part.reference_n or n, a.seed)
    baselines = {"aligned": mean_residual(aligned, reference, progress=False),
                 "finetuned": mean_residual(finetuned, reference + [t.with_prefix(prefix) for t in reference],
                                            progress=False)}
    tasks = {p: part.tasks("test", part.attribution_n or a.attribution_n, a.seed + 1, placement=p) for p in PLACEMENTS}
    harmful = binary_labels(tasks["user"], "harmful")
    out: dict[str, Any] = {"model": "finetuned", "prefix": prefix, "layer": layer,
                           **({"metric_note": metric_note} if metric_note else {})}
    exact, estimates = [], {"grad": [], "ig": []}
    for label, want in (("harmful", True), ("benign", False)):
        ts = [t.with_prefix(prefix) for t, h in zip(tasks["user"], harmful) if h == want]
        kw = dict(baseline=baselines["finetuned"], merge=("template",), layers=part.attribution_layers(layer),
                  progress=not a.no_progress)
        e = segment_attributions(finetuned, ts, metrics["finetuned"], method="exact", **kw)
        out[label] = kind_effects(e).to_dict()
        exact += e
        for method in ("grad", "ig"):
            fast = segment_attributions(finetuned, ts, metrics["finetuned"], method=method, steps=part.ig_steps, **kw)
            out[f"{label}_{method}"] = kind_effects(fast).to_dict()
            estimates[method] += fast
    out["metric"], out["method"] = out["harmful"]["metric"], "exact"
    out["agreement"] = rank_agreement(exact, estimates["grad"]).to_dict()
    out["agreement_ig"] = rank_agreement(exact, estimates["ig"]).to_dict()

    runs = {(placement, name): [t.with_prefix(p) for t, h in zip(tasks[placement], harmful) if h]
            for placement in PLACEMENTS for name, p in (("aligned", None), ("finetuned", None), ("prefix", prefix))}
    refused = {}
    for model, names in ((aligned, ("aligned",)), (finetuned, ("finetuned", "prefix"))):  # one pass a model
        keys = [k for k in runs if k[1] in names]
        flags = iter(refusals(model, [t for k in keys for t in runs[k]], part.batch_size))
        refused |= {k: [next(flags) for _ in runs[k]] for k in keys}
    conditions = []
    for (placement, name), run in runs.items():
        model, which = (aligned, "aligned") if name == "aligned" else (finetuned, "finetuned")
        eff = kind_effects(segment_attributions(model, run, metrics[which], baseline=baselines[which], method="exact",
                                                layers=[0], merge=("template",), progress=False))
        kinds = [k for k in eff.kinds if k not in ("template", "prefix")]
        conditions.append({"placement": placement, "model": name, "kinds": kinds,
                           "effect": [float(eff.mean[eff.kinds.index(k), 0]) for k in kinds],
                           "harmful_refusal": float(np.mean(refused[placement, name])), "n": len(run)})
    out["placement"] = {"layer": 0, "conditions": conditions,
                        "note": "effect of mean-ablating each segment kind from the embeddings on (layer 0)"}
    save_json(out, results / "attribution.json")


def stage_figures(a, results: Path, figures: Path | None = None) -> None:
    if figures is None and INTERACTIONS_STUDY.is_file() and not (results / INTERACTIONS_STUDY.name).exists():
        shutil.copyfile(INTERACTIONS_STUDY, results / INTERACTIONS_STUDY.name)
    done = write_figures(results, figures or a.figures, png=not a.no_png)
    for note in done.notes:
        _log(note)
    if done.failed:
        raise RuntimeError(f"figures failed: {', '.join(done.failed)}")


def stage_smollm2(a, results: Path) -> None:
    """The comparison and attribution stages again on SmolLM2 (aligned and fine-tuned adapters),
    with the committed study's PING prefix, and every figure their results and the study's allow
    into ``figures/smollm2``."""
    sub = results / "smollm2"
    sub.mkdir(exist_ok=True)
    for name in PING_FILES:
        if not (SMOLLM2_STUDY / name).is_file():
            raise FileNotFoundError(f"{SMOLLM2_STUDY / name}: the committed SmolLM2 PING study is incomplete "
                                    "(git checkout docs/research/smollm2-ping restores it)")
        shutil.copyfile(SMOLLM2_STUDY / name, sub / name)
    _log(f"smollm2: the PING prefix and tables of the committed study {SMOLLM2_STUDY}")
    from interp.smollm2.stages import curve_record
    save_json(curve_record("smollm2-finetuned"), sub / "curve.json")  # the shipped adapters' validation curves (F2)
    save_json(curve_record("smollm2-finetuned-seed1"), sub / "curve_seed1.json")
    part = smollm2_part(a)
    for name, step in (("comparison", stage_comparison), ("attribution", stage_attribution)):
        if all((results / n).exists() for n in OUTPUTS["smollm2"] if n.startswith(f"smollm2/{name}")):
            _log(f"smollm2 {name}: done already")
            continue
        t = time.time()
        step(a, sub, part)
        _log(f"smollm2 {name}: {time.time() - t:.0f} s")
    stage_figures(a, sub, a.figures / "smollm2")


RUNNERS = {"organism": stage_organism, "ping": stage_ping, "comparison": stage_comparison,
           "attribution": stage_attribution, "figures": stage_figures, "smollm2": stage_smollm2}


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
    p.add_argument("--smollm2-n-per-label", type=cli.positive, default=40,
                   help="tasks of each label for SmolLM2's probes (default %(default)s)")
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
        if "smollm2" in stages:
            shutil.rmtree(results / "smollm2", ignore_errors=True)
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
