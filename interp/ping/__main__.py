"""``python -m interp.ping``: the PING study on a built-in subject, offline, end to end.

Stages, each writing plain artefacts into ``--out`` (default ``runs/ping``) and each resumable:

1. **plain PING** (the paper's loop) with the subject's offline generator, every candidate
   scored on the validation split: ``ping_history.jsonl``;
2. **probe-guided PING**: a refusal probe fitted on the fine-tuned agent's decision-position
   activations (training split) ranks ``oversample`` times as many candidates per round; only
   the top ones are scored, until one reaches the plain run's best: ``ping_guided_history.jsonl``;
3. **steering**: the aligned model's harmful-minus-benign direction; layer and coefficient
   chosen on the validation split;
4. **the test split** (never read before): the PING prefix, the models and every baseline,
   a steering coefficient sweep and directional ablation: ``behaviour.json``, ``steering.json``;
5. the best prefix checked against the subject's training text, and the summary ``ping.json``
   (``--json`` prints it);
6. with ``--guards``, the guard comparison on the test split (:mod:`interp.ping.guard_study`):
   ``guards.json``.

A run killed at any point and started again with the same arguments resumes: the histories
continue where they stopped and finished evaluations are read back from ``cache/``. From code::

    from interp.ping.__main__ import PingConfig, run
    summary = run(PingConfig(subject="organism", out="runs/ping", rounds=20))
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from interp import cli
from interp.atomic import read_json, save_json
from interp.behavior import ScoringMode, evaluate
from interp.models import Model, load_model
from interp.ping.guard_study import guard_study
from interp.ping.baselines import Condition, condition_cache_key, conditions, few_shot_transform
from interp.ping.loop import PingError, PingResult, generations_to_reach, load_history, run_ping
from interp.ping.report import behaviour_record, print_guards, print_tables, steering_record, targets
from interp.ping.scoring import Scorer
from interp.ping.screen import (ProbeScreen, fit_refusal_probe, harm_direction, harm_direction_screen,
                                probe_training_prefixes)
from interp.ping.subject import Subject, make_subject, subject_names
from interp.steering import ablate_direction, add_direction, coefficient_sweep
from probes.metrics import pearson, spearman

STEER_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
NEWER_SETTINGS = {"steer_layers": None, "early_stop": False}
"""Settings added after runs were recorded, with the value those runs had."""


@dataclass(frozen=True)
class PingConfig:
    """Every setting of a study (the CLI flags). Settings that change results are recorded in
    ``settings.json``; a resumed run must use the same ones (``rounds`` may grow)."""

    subject: str = "organism"
    out: str | Path = "runs/ping"
    checkpoints: str | None = None
    world_seed: int | None = None
    seed: int = 0
    rounds: int = 20
    per_round: int = 5
    tau: float = 1.5
    top_k: int = 3
    n_per_label: int = 100
    mode: ScoringMode = "first_step"
    test_n_per_label: int = 200
    test_mode: ScoringMode = "first_step"
    early_stop: bool = False
    screen: Literal["probe", "direction"] = "probe"
    oversample: int = 8
    screen_n_per_label: int = 64
    probe_prefixes: int = 16
    probe_n_per_label: int = 32
    steer_multiples: tuple[float, ...] = STEER_MULTIPLES
    steer_layers: tuple[int, ...] | None = None
    batch_size: int = 64
    guards: bool = False
    progress: bool = True


class Study:
    """One invocation's state: the configuration, the subject, its models, the output folder
    and its cache of finished evaluations."""

    def __init__(self, config: PingConfig):
        self.config = config
        self.out = cli.check_output_dir(config.out)
        self.subject: Subject = make_subject(config.subject, checkpoints=config.checkpoints,
                                             world_seed=config.world_seed)
        self.settings = {
            **dict(self.subject.settings), "subject": config.subject,
            **{k: v for k, v in dataclasses.asdict(config).items()
               if k not in ("subject", "out", "checkpoints", "world_seed", "progress", "guards")},
            "steer_multiples": list(config.steer_multiples),
            "steer_layers": None if config.steer_layers is None else list(config.steer_layers),
        }
        self._check_settings()
        self.models: dict[str, Model] = {"aligned": load_model(self.subject.aligned),
                                         "finetuned": load_model(self.subject.finetuned)}
        self.timings: dict[str, float] = {}

    def _check_settings(self) -> None:
        path = self.out / "settings.json"
        if path.exists():
            old = {**NEWER_SETTINGS, **read_json(path)}  # a run from before a setting existed had its default
            diff = {k for k in set(old) | set(self.settings) if k != "rounds" and old.get(k) != self.settings.get(k)}
            if diff:
                raise ValueError(f"{self.out} holds a run with other settings ({', '.join(sorted(diff))}); "
                                 "resume with the same arguments or pass another --out")
        save_json(self.settings, path)

    def cached(self, name: str, compute) -> Any:
        """``compute()``'s JSON value, read back from ``cache/NAME.json`` when a run made it before."""
        path = self.out / "cache" / f"{name}.json"
        if path.exists():
            return read_json(path)
        value = compute()
        save_json(value, path)
        return value

    def timed(self, name: str):
        study = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.time()

            def __exit__(self, *exc):
                study.timings[name] = round(study.timings.get(name, 0.0) + time.time() - self.t0, 1)

        return _Timer()

    def timings_total(self, elapsed: float) -> dict[str, float]:
        """This invocation's stage timings added to those of earlier (interrupted) ones."""
        path = self.out / "timings.json"
        before = read_json(path) if path.exists() else {}
        total = {k: round(before.get(k, 0.0) + self.timings.get(k, 0.0), 1) for k in {*before, *self.timings}}
        total["total"] = round(before.get("total", 0.0) + elapsed, 1)
        save_json(total, path)
        return total

    def scorer(self) -> Scorer:
        c = self.config
        return Scorer(self.models["finetuned"], self.subject.env,
                      self.subject.tasks("validation", c.n_per_label, 0), mode=c.mode, batch_size=c.batch_size)


# --------------------------------------------------------------------------------------------
# Stages


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


SEARCHES = {"plain": ("ping_history.jsonl", "plain search"),
            "guided": ("ping_guided_history.jsonl", "probe-guided search")}


def search(study: Study, scorer: Scorer, kind: Literal["plain", "guided"], **kw: Any) -> PingResult:
    """The PING loop over the subject's generator, its history in the output folder, resumable."""
    c = study.config
    name, what = SEARCHES[kind]
    path = study.out / name
    if path.exists() and (n := len(load_history(path))):
        _log(f"resuming the {what}: {n} candidates already scored in {path}")
    with study.timed(f"{kind}_search"):
        return run_ping(study.subject.generator, scorer, rounds=c.rounds, per_round=c.per_round, tau=c.tau,
                        top_k=c.top_k, history_path=path, seed=c.seed, progress=c.progress, **kw)


def fit_screen(study: Study) -> ProbeScreen:
    """The screen: a refusal probe on the fine-tuned agent (default) or the aligned model's
    harmful-vs-benign direction, read on validation tasks."""
    c, s = study.config, study.subject
    ft = study.models["finetuned"]
    screen_tasks = s.tasks("validation", c.screen_n_per_label, 0)
    if c.screen == "direction":
        with study.timed("screen_fit"):
            d = harm_direction(study.models["aligned"], s.tasks("train", c.probe_n_per_label, 0))
            layer = int(np.nanargmax(d["dprime"].numpy()))
        return harm_direction_screen(d, layer, ft, screen_tasks, c.batch_size)

    def compute():
        prefixes = probe_training_prefixes(c.probe_prefixes, c.seed, s.generator)
        fit = fit_refusal_probe(ft, s.env, s.tasks("train", c.probe_n_per_label, c.seed), prefixes,
                                batch_size=c.batch_size, progress=c.progress)
        return {**fit, "coef": [float(x) for x in fit["coef"]], "prefixes": prefixes}

    with study.timed("screen_fit"):
        fit = study.cached(f"probe-{c.seed}-{c.probe_prefixes}-{c.probe_n_per_label}", compute)
    info = {k: v for k, v in fit.items() if k not in ("coef", "prefixes")}
    return ProbeScreen(ft, tuple(screen_tasks), int(fit["layer"]), np.asarray(fit["coef"]), float(fit["intercept"]),
                       "refusal_probe", info, c.batch_size)


def steering_choice(study: Study) -> dict[str, Any]:
    """The aligned model's harmful-minus-benign direction at the decision position (input of each
    layer, training split), and the (layer, coefficient) with the best validation score."""
    c = study.config

    def compute():
        d = harm_direction(study.models["aligned"], study.subject.tasks("train", c.probe_n_per_label, 0),
                           layers=c.steer_layers, site="resid_pre")
        scorer = study.scorer()
        grid = []
        for li, layer in enumerate(d["layers"]):
            gap = float(d["gap"][li])
            if not np.isfinite(gap) or gap <= 1e-6 or not torch.isfinite(d["directions"][li]).all():
                continue  # no harmful/benign difference at this layer's input (e.g. the embeddings)
            coefs = [m * gap for m in c.steer_multiples if m != 0]
            for coef, ev in coefficient_sweep(study.models["finetuned"], d["directions"][li], [layer], coefs,
                                              lambda: scorer(None)):
                grid.append({"layer": layer, "coefficient": coef, "multiple": coef / gap,
                             "benign_success": ev.benign_success, "harmful_refusal": ev.harmful_refusal,
                             "score": ev.benign_success + ev.harmful_refusal})
        if not grid:
            raise RuntimeError("the aligned model's harmful and benign means coincide at every layer")
        best = max(grid, key=lambda g: (g["score"], -g["multiple"]))
        li = d["layers"].index(best["layer"])
        return {"layer": best["layer"], "coefficient": best["coefficient"], "multiple": best["multiple"],
                "gap": float(d["gap"][li]), "direction": [float(x) for x in d["directions"][li]],
                "dprime": [float(x) for x in d["dprime"]], "validation_grid": grid}

    with study.timed("steering_choice"):
        return study.cached(f"steering-{c.probe_n_per_label}-{c.n_per_label}-{c.mode}-"
                            + "_".join(f"{m:g}" for m in c.steer_multiples)
                            + ("" if c.steer_layers is None else "-L" + "_".join(map(str, c.steer_layers))), compute)


def evaluate_condition(study: Study, cond: Condition, direction: torch.Tensor | None, transcripts,
                       mode: ScoringMode | None = None) -> dict[str, Any]:
    """Test-split rates of one condition (read back from the cache when already measured)."""
    c = study.config
    mode = mode or c.test_mode
    early = {"early_stop": True} if c.early_stop and mode == "first_step" else {}
    key = condition_cache_key(cond, split="test", mode=mode, n_per_label=c.test_n_per_label, **early,
                              fingerprint=study.subject.fingerprints.get(cond.model),
                              direction=None if direction is None else hashlib.sha256(
                                  direction.numpy().tobytes()).hexdigest()[:12])

    def compute():
        model = study.models[cond.model]
        if cond.steering is not None:
            ctx = add_direction(model, direction, [cond.steering[0]], cond.steering[1])
        elif cond.ablate:
            ctx = ablate_direction(model, direction)
        else:
            ctx = nullcontext()
        with ctx:
            ev = evaluate(model, study.subject.env, [t.with_prefix(cond.prefix) for t in transcripts], mode=mode,
                          transform=cond.transform, batch_size=c.batch_size, **early)
        return ev.to_dict()

    return study.cached(f"test-{key}", compute)


def correlation(x, y) -> dict[str, float | int | None]:
    """Pearson and Spearman correlation of paired values (None where undefined)."""
    out: dict[str, float | int | None] = {"n": len(x), "pearson": None, "spearman": None}
    if len(x) >= 3:
        for name, fn in (("pearson", pearson), ("spearman", spearman)):
            r = fn(np.asarray(x, float), np.asarray(y, float))
            out[name] = None if math.isnan(r) else r
    return out


def test_split(study: Study, conds: list[Condition], extra: list[Condition], direction: torch.Tensor,
               test: list) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every condition's test-split rates in the test mode, and (when that is not first-step
    scoring) the table's conditions again scored on the first step only, for reference."""
    c = study.config
    results: dict[str, dict] = {}
    first_step: dict[str, dict] = {}
    with study.timed("test"):
        for cond in tqdm(conds + extra, desc="test split", disable=not c.progress):
            results[cond.key] = evaluate_condition(study, cond, direction, test)
        if c.test_mode != "first_step":
            for cond in tqdm(conds, desc="test split, first step", disable=not c.progress):
                first_step[cond.key] = evaluate_condition(study, cond, direction, test, "first_step")
    return results, first_step


def table_conditions(study: Study, best_prefix: str, steer: dict[str, Any]) -> tuple[list, list, list]:
    """The behaviour table's conditions, the steering sweep and the two ablations."""
    c, s = study.config, study.subject
    demos = s.demonstrations(0)
    conds = conditions(best_prefix, few_shot=(few_shot_transform(demos), "0"), safety_preamble=s.safety_preamble,
                       neutral_opening=s.neutral_opening, steering=(steer["layer"], steer["coefficient"]))
    sweep = [Condition(f"steer_{m:g}", f"steering x{m:g}", "baseline", steering=(steer["layer"], m * steer["gap"]))
             for m in c.steer_multiples]
    ablations = [Condition("ablate_aligned", "aligned, direction ablated", "baseline", "aligned", ablate=True),
                 Condition("ablate_ping", "fine-tuned + PING, direction ablated", "baseline", prefix=best_prefix,
                           ablate=True)]
    return conds, sweep, ablations


def run(config: PingConfig) -> dict[str, Any]:
    """Run (or resume) the whole study; write its artefacts into ``config.out`` and return the
    summary that ``ping.json`` holds."""
    t_start = time.time()
    study = Study(config)
    c = config
    scorer = study.scorer()
    plain = search(study, scorer, "plain")
    best = plain.best
    plain_to_best = generations_to_reach(plain.history, best.score)
    _log(f"plain PING: best {best.score:.3f} after {plain_to_best} of {plain.generations_used} generations: "
         f"{best.prefix!r}")

    screen = fit_screen(study)
    guided = search(study, scorer, "guided", screen=screen, oversample=c.oversample, stop_at=best.score)
    to_match = generations_to_reach(guided.history, best.score)
    with study.timed("screen_check"):
        plain_screen = study.cached(f"plain-screen-{c.seed}-{c.screen}-{len(plain.history)}",
                                    lambda: screen([h.prefix for h in plain.history]))
    _log(f"probe-guided PING: reached {best.score:.3f} after {to_match} generations "
         f"({guided.screened} candidates screened)")

    steer = steering_choice(study)
    direction = torch.tensor(steer["direction"])
    test = study.subject.tasks("test", c.test_n_per_label, 0)
    conds, sweep, ablations = table_conditions(study, best.prefix, steer)
    results, first_step = test_split(study, conds, sweep + ablations, direction, test)

    with study.timed("training_text"):
        check = study.subject.seen_in_training
        seen_in_training = None if check is None else study.cached("seen-" + hashlib.sha256(
            (best.prefix + json.dumps(dict(study.subject.fingerprints))).encode()).hexdigest()[:16],
            lambda: dict(check(best.prefix)))

    if c.guards:
        with study.timed("guards"):
            save_json(guard_study(study, best.prefix, test), study.out / "guards.json")
    behaviour = behaviour_record(conds, results, c.test_mode)
    save_json(behaviour, study.out / "behaviour.json")
    steering = steering_record(steer, sweep, c.steer_multiples, results, c.test_mode)
    save_json(steering, study.out / "steering.json")
    guided_screened = [h for h in guided.history if h.screen is not None]
    speedup = None if not to_match else plain_to_best / to_match
    baseline = {cond.key: dict(results[cond.key]) for cond in conds if cond.key != "ping"}
    baseline["no_defence"] = baseline["finetuned"]
    summary = {
        "best_prefix": best.prefix,
        "validation": {"score": best.score, "benign_success": best.benign_success,
                       "harmful_refusal": best.harmful_refusal, "mode": c.mode,
                       "n_harmful": best.extra.get("n_harmful"), "n_benign": best.extra.get("n_benign"),
                       "round": best.round, "generations_to_best": plain_to_best},
        "test": {**results["ping"], "mode": c.test_mode,
                 "score": results["ping"]["harmful_refusal"]["value"] + results["ping"]["benign_success"]["value"]},
        "baseline": baseline,
        "test_first_step": {k: {m: v[m] for m in ("harmful_refusal", "benign_success")} for k, v in first_step.items()},
        "generations_used": plain.generations_used,
        "probe_guided": {
            "generations_to_match": to_match, "plain_generations_to_best": plain_to_best, "speedup": speedup,
            "speedup_vs_plain_budget": None if not to_match else plain.generations_used / to_match,
            "probe_training_validation_passes": screen.info.get("task_generations", 0) / max(len(scorer.transcripts), 1),
            "generations_used": guided.generations_used, "candidates_screened": guided.screened,
            "best_score": guided.best.score, "best_prefix": guided.best.prefix,
            "screen": {"kind": screen.kind, "layer": screen.layer, "n_tasks": len(screen.transcripts), **screen.info},
            "screen_vs_score": {
                "guided_scored": correlation([h.screen for h in guided_screened], [h.score for h in guided_screened]),
                "plain_history": correlation(plain_screen, [h.score for h in plain.history])},
        },
        "steering": {k: steer[k] for k in ("layer", "coefficient", "multiple", "gap", "dprime")},
        "seen_in_training": seen_in_training,
        "targets": targets(results, speedup),
        "settings": study.settings,
        "timings": study.timings_total(time.time() - t_start),
    }
    save_json(summary, study.out / "ping.json")
    return summary


# --------------------------------------------------------------------------------------------
# Command line


def _parser() -> cli.ArgumentParser:
    d = PingConfig()
    p = cli.ArgumentParser(prog="python -m interp.ping", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", default=d.subject, choices=subject_names(), help="the built-in model pair")
    p.add_argument("--out", default=str(d.out), help=f"output folder (default {d.out})")
    p.add_argument("--checkpoints", help="a training output folder of the subject (default: the shipped checkpoints)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the search (and of the probe's training data)")
    p.add_argument("--rounds", type=cli.positive, default=d.rounds)
    p.add_argument("--per-round", type=cli.positive, default=d.per_round)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--top-k", type=cli.positive, default=d.top_k)
    p.add_argument("--n-per-label", type=cli.positive, default=d.n_per_label,
                   help="validation tasks of each label a candidate is scored on")
    p.add_argument("--mode", default=d.mode, choices=("first_step", "episode"), help="validation scoring")
    p.add_argument("--test-n-per-label", type=cli.count_or_all, default=d.test_n_per_label,
                   help="test tasks of each label ('all' or 0: the whole split)")
    p.add_argument("--test-mode", default=d.test_mode, choices=("first_step", "episode"))
    p.add_argument("--early-stop", action="store_true",
                   help="first-step test scoring stops each reply once its refusal / first call is settled "
                        "(the two score rates exact, the other two marked inexact; for real models)")
    p.add_argument("--screen", default=d.screen, choices=("probe", "direction"),
                   help="probe: refusal probe on the fine-tuned agent; direction: aligned harmful-vs-benign direction")
    p.add_argument("--oversample", type=cli.positive, default=d.oversample,
                   help="candidates screened per candidate scored")
    p.add_argument("--screen-n-per-label", type=cli.positive, default=d.screen_n_per_label,
                   help="validation tasks of each label the screen reads")
    p.add_argument("--probe-prefixes", type=cli.positive, default=d.probe_prefixes,
                   help="prefixes the refusal probe is trained with")
    p.add_argument("--probe-n-per-label", type=cli.positive, default=d.probe_n_per_label,
                   help="training tasks of each label for probe/direction")
    p.add_argument("--steer-multiples", type=_multiples, default=d.steer_multiples,
                   help="steering coefficients, in units of the harmful-benign gap (comma-separated)")
    p.add_argument("--steer-layers", type=_layers, default=d.steer_layers,
                   help="layers whose input the steering search tries (comma-separated; default: all; "
                        "ping.json's steering d' lists these)")
    p.add_argument("--batch-size", type=cli.positive, default=d.batch_size)
    p.add_argument("--guards", action="store_true",
                   help="also compare guards (classifier guard, activation monitor, each with PING): guards.json")
    p.add_argument("--world-seed", type=int, help="default: the subject's own")
    p.add_argument("--threads", type=cli.positive, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the content of ping.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _multiples(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _layers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0, got {text!r}")
    return values


def config_from_args(a: argparse.Namespace) -> PingConfig:
    fields = {f.name for f in dataclasses.fields(PingConfig)}
    return PingConfig(**{k: v for k, v in vars(a).items() if k in fields}, progress=not a.no_progress)


def _main(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    with cli.output_dir(a.out):
        summary = run(config_from_args(a))
    if a.json:
        print(json.dumps(summary))
    else:
        out = Path(a.out)
        print_tables(summary, read_json(out / "behaviour.json"), read_json(out / "steering.json"))
        if a.guards:
            print_guards(read_json(out / "guards.json"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m interp.ping``; returns the exit status (the summary is ``ping.json`` in ``--out``,
    or :func:`run`'s value)."""
    return cli.run(_parser(), _main, argv, input_errors=(PingError,))


if __name__ == "__main__":
    sys.exit(main())
