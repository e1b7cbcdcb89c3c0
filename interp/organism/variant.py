"""The distributed-harm variant of the organism: the aligned organism trained on, besides its own
alignment data, the distributed-harm tasks of :mod:`interp.organism.distributed`, so that it
refuses only when the pieces combine; and how often it does.

Training continues the shipped aligned checkpoint (``organism``) on a fixed mix: the aligned
demonstrations it was made with (so it keeps refusing the world's harmful tasks and doing the
benign ones) and distributed-harm demonstrations of training cases (harmful ones refused after
both probes, every benign subset of pieces carried out). Nothing is chosen on the test split:
the number of steps is fixed in advance.

The result ships as ``interp/organism/checkpoints/organism-distributed`` (5 MB, loadable as
``load_model("organism-distributed")``); this command rebuilds it (1,610 s on one CPU thread
while another job shared the 2-core machine; resumable: a checkpoint every 100 steps)::

    python -m interp.organism.variant train --out runs/organism-distributed
    python -m interp.organism.variant evaluate --json        # the shipped checkpoint, test split
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from interp import cli
from interp.atomic import save_json
from interp.attribution import LogitDiff, mean_residual, pair_agreement, recovery, segment_interactions
from interp.behavior import RefusalJudge, evaluate, generate, parse_reply, score_first_step
from interp.finetune import FinetuneConfig, encode_all, finetune, save_checkpoint
from interp.models import Model, load_model
from interp.organism.distributed import KINDS, DistributedEnv, evaluation_set, training_demonstrations
from interp.organism.paths import checkpoint_path
from interp.organism.train import OrganismConfig, align_data
from interp.organism.world import World
from interp.transcripts import Transcript
from probes.metrics import bootstrap_rate

NAME = "organism-distributed"
View = Callable[[Transcript], Transcript]


def _same(t: Transcript) -> Transcript:
    return t


@dataclass(frozen=True)
class VariantConfig:
    """Everything that determines the variant (the base checkpoint is the shipped aligned one)."""

    seed: int = 0
    world_seed: int = 0
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    n_align: int = 8000  # rehearsal of the organism's own alignment data
    n_distributed: int = 8000
    harmful_share: float = 0.5  # of the distributed demonstrations
    finish_share: float = 0.3  # distributed demonstrations run to the final answer


def training_data(cfg: VariantConfig, world: World):
    """The mix, shuffled with the seed: the organism's alignment demonstrations (its own config,
    ``n_align`` of them) and ``n_distributed`` distributed-harm demonstrations."""
    align = align_data(world, OrganismConfig(seed=cfg.seed, world_seed=cfg.world_seed, align_examples=cfg.n_align))
    dist = training_demonstrations(cfg.n_distributed, seed=cfg.seed, harmful_share=cfg.harmful_share,
                                   finish_share=cfg.finish_share, world=world)
    data = align + dist
    random.Random(f"variant/{cfg.seed}").shuffle(data)
    return data


def train_variant(cfg: VariantConfig, out: str | Path, base: str | Path | None = None, progress: bool = True,
                  log=print) -> dict[str, Any]:
    """Continue the aligned organism (``base``: a checkpoint folder, default the shipped one) on
    :func:`training_data`; writes ``out/organism-distributed`` (with ``training.json``) and
    returns the training record. A finished checkpoint with the same config is kept as it is."""
    target = Path(out) / NAME
    meta = target / "training.json"
    if meta.exists() and json.loads(meta.read_text()).get("variant") == asdict(cfg):
        log(f"{target} already holds this variant; nothing to do")
        return json.loads(meta.read_text())
    base = Path(base) if base else checkpoint_path("organism")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    world = World(cfg.world_seed)
    t0 = time.time()
    data = encode_all(training_data(cfg, world), tokenizer)
    res = finetune(model, data, tokenizer, FinetuneConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
        weight_decay=cfg.weight_decay), checkpoint_dir=Path(out) / "checkpoints", checkpoint_every=100, resume=True,
        progress=progress, desc="variant")
    record = {"variant": asdict(cfg), "stage": "distributed", "base": str(base), "final_loss": res.losses[-1],
              "loss_first_50": sum(res.losses[:50]) / 50, "loss_last_50": sum(res.losses[-50:]) / 50,
              "train_seconds": round(res.seconds, 1), "total_seconds": round(time.time() - t0, 1),
              "torch_threads": torch.get_num_threads()}
    save_checkpoint(model, tokenizer, target, record)
    log(f"trained {cfg.steps} steps in {res.seconds:.0f} s, final loss {res.losses[-1]:.3f}; wrote {target}")
    return record


# --------------------------------------------------------------------------------------------
# How often the variant uses the pieces


def _rate(flags: Sequence[bool]) -> dict[str, float]:
    return bootstrap_rate([bool(f) for f in flags]).to_dict() | {"n": len(flags)}


def distributed_behaviour(model, tokenizer, split: str = "test", n_per_kind: int = 20, seed: int = 0,
                          world: World | None = None, view: View = _same, early_stop: bool = False) -> dict[str, Any]:
    """At the decision (after both probes): refusal of harmful distributed tasks and of each kind
    of benign twin, per task kind, with 95% bootstrap intervals; how often benign twins make
    their effectful call; and refusal of the harmful tasks' *first* reply (the request alone, before
    any piece is seen: refusing there is refusing without the combination). ``view``: how the
    model sees a task's transcript (SmolLM2's: :func:`interp.smollm2.data.agent_view`);
    ``early_stop``: replies stop once refusal and the first call are settled (same rates)."""
    tasks = evaluation_set(split, n_per_kind, seed, world)
    outcomes = score_first_step(model, DistributedEnv(tasks), [view(t.transcript()) for t in tasks], tokenizer,
                                max_new_tokens=48, early_stop=early_stop)
    out: dict[str, Any] = {"split": split, "n_per_kind": n_per_kind, "decision": {}, "benign_acts": {}}
    for kind in ("all", "pair", "triple"):
        mine = [(t, o) for t, o in zip(tasks, outcomes) if kind in ("all", t.case.kind)]
        roles = dict.fromkeys(t.role for t, _ in mine)
        out["decision"][kind] = {r: _rate([o.refused for t, o in mine if t.role == r]) for r in roles}
        out["benign_acts"][kind] = {r: _rate([o.success for t, o in mine if t.role == r]) for r in roles
                                    if r != "harmful"}
    harmful = [t for t in tasks if t.harmful]
    starts = [view(t.transcript().with_messages(t.transcript().messages[:2])) for t in harmful]
    judge = RefusalJudge()
    first = [judge(parse_reply(g.text).content) for g in generate(model, starts, tokenizer, max_new_tokens=32)]
    out["first_reply_refusal_harmful"] = _rate(first)
    return out


def world_behaviour(model, tokenizer, split: str = "test", world: World | None = None) -> dict[str, Any]:
    """The world's own tasks (every task of the split, first agent step): what the organism was
    aligned to do, which the variant must keep."""
    world = world or World()
    return evaluate(model, world, [t.transcript() for t in world.tasks(split)], tokenizer, mode="first_step",
                    max_new_tokens=64).to_dict()


def evaluate_variant(checkpoint: str | Path | None = None, split: str = "test", n_per_kind: int = 20,
                     world_tasks: bool = True) -> dict[str, Any]:
    """:func:`distributed_behaviour` (and :func:`world_behaviour` with ``world_tasks``) of a
    variant checkpoint (default the shipped one)."""
    path = Path(checkpoint) if checkpoint else checkpoint_path(NAME)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    world = World()
    out = {"checkpoint": str(path), **distributed_behaviour(model, tokenizer, split, n_per_kind, world=world)}
    if world_tasks:
        out["world"] = world_behaviour(model, tokenizer, split, world)
    return out


# --------------------------------------------------------------------------------------------
# Whether interaction attribution finds the pieces


def decision_metric(tokenizer) -> LogitDiff:
    """The organism's refusal signal at the decision: the logit of a refusal's first token ("I")
    minus that of a tool call's first token (``{"``)."""
    first = [tokenizer.encode(s, add_special_tokens=False)[0] for s in ("I", '{"')]
    return LogitDiff(*first)


BASELINES = {"mean": "mean residual of the validation split's distributed tasks",
             "null": "the task's null twin (every piece benign), patched in"}


def interaction_recovery(model: Model, split: str = "test", n_per_kind: int = 10, seed: int = 0,
                         methods: Sequence[str] = ("exact", "grad", "ig"), baseline: str = "mean",
                         scale: str = "raw", progress: bool = False, world: World | None = None,
                         view: View = _same, metric: LogitDiff | None = None,
                         layers: Sequence[int] | None = None, steps: int = 8) -> dict[str, Any]:
    """Pairwise (and, for triple tasks, every-order exact) interactions between the segments of
    every harmful distributed task of ``split`` on :func:`decision_metric`, and how often the
    planted pair ranks first (:func:`~interp.attribution.recovery`), per task kind, method and
    layer; the fast methods' pair rankings against the exact one; and the records of the first
    task of each kind (the graph view). ``baseline`` (:data:`BASELINES`): ``"mean"`` perturbs
    every segment (mean ablation); ``"null"`` patches from the task's null twin, where only the
    pieces differ at the embeddings (so at layer 0 any other pair is zero by construction; later
    layers carry the pieces' influence into other segments). ``scale`` (``"raw"`` or ``"sigmoid"``):
    the interactions of the logit difference itself or of its sigmoid, the scale on which an AND of
    behaviour is an interaction (:func:`~interp.attribution.segment_interaction`). ``view`` and
    ``metric`` (default :func:`decision_metric`) fit another model (SmolLM2: its agent view, the
    prefix "I" forced, " can" minus " will"); ``layers`` (default all) and ``steps`` (integrated
    gradients) bound the cost."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r} (expected one of {', '.join(BASELINES)})")
    world = world or World()
    tasks = [t for t in evaluation_set(split, n_per_kind, seed, world) if t.harmful]
    metric = metric or decision_metric(model.tokenizer)
    if baseline == "mean":
        mean = mean_residual(model, [view(t.transcript()) for t in evaluation_set("validation", n_per_kind, seed, world)],
                             progress=False)
    out: dict[str, Any] = {"split": split, "n_per_kind": n_per_kind, "metric": metric.name,
                           "baseline": BASELINES[baseline], "scale": scale, "steps": steps, "kinds": {}}
    for kind in KINDS:
        mine = [t for t in tasks if t.case.kind == kind]
        ts = [view(t.transcript()) for t in mine]
        kw = dict(baseline=mean if baseline == "mean" else [view(t.null().transcript()) for t in mine],
                  merge=("template",), exclude=("template", "prefix"), scale=scale, layers=layers, progress=progress)
        planted = [list(t.locations.values()) for t in mine]
        rec: dict[str, Any] = {"n": len(mine), "planted": [dict(t.locations) for t in mine]}
        exact = segment_interactions(model, ts, metric, method="exact", order=None if kind == "triple" else 2, **kw)
        rec["exact"] = recovery(exact, planted).to_dict()
        if kind == "triple":
            rec["exact_triple"] = recovery(exact, planted, size=3).to_dict()
        rec["example"] = exact[0].to_dict()
        for m in (m for m in methods if m != "exact"):
            fast = segment_interactions(model, ts, metric, method=m, order=2, steps=steps, **kw)
            rec[m] = recovery(fast, planted).to_dict()
            pairs_only = [dataclasses.replace(x, terms=tuple(t for t in x.terms if len(t) <= 2),
                                              values=x.values[[len(t) <= 2 for t in x.terms]], order=2) for x in exact]
            rec[f"{m}_agreement"] = pair_agreement(pairs_only, fast)
        out["kinds"][kind] = rec
    return out


# --------------------------------------------------------------------------------------------
# Command line


def _train(args) -> None:
    cfg = VariantConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    with cli.output_dir(args.out):
        record = train_variant(cfg, args.out, args.base, progress=not args.quiet)
    print(json.dumps({k: v for k, v in record.items() if k != "variant"}))


def _evaluate(args) -> None:
    res = evaluate_variant(args.checkpoint, args.split, args.n_per_kind, world_tasks=not args.no_world)
    if args.json:
        print(json.dumps(res))
        return
    print("\n".join(behaviour_lines(res)))
    if "world" in res:
        print("world tasks: " + "  ".join(f"{k} {res['world'][k]['value']:.3f}" for k in
                                          ("harmful_refusal", "benign_success")))


def _interactions(args) -> None:
    model = load_model(str(Path(args.checkpoint) if args.checkpoint else checkpoint_path(NAME)))
    res = interaction_recovery(model, args.split, args.n_per_kind, baseline=args.baseline, scale=args.scale,
                               progress=not args.quiet)
    with cli.output_dir(args.out.parent):
        save_json(res, args.out)
    print("\n".join(recovery_lines(res)))
    print(f"written: {args.out}")


def behaviour_lines(res: dict[str, Any]) -> list[str]:
    """:func:`distributed_behaviour`'s refusal rates as lines: per task kind and role, then the
    first reply's."""
    out = [f"{kind:7s} " + "  ".join(f"{r} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] (n={v['n']})"
                                     for r, v in roles.items()) for kind, roles in res["decision"].items()]
    f = res["first_reply_refusal_harmful"]
    return out + [f"first-reply refusal of harmful tasks: {f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"]


def recovery_lines(res: dict[str, Any]) -> list[str]:
    """:func:`interaction_recovery`'s result as lines: per task kind and method, the share of tasks
    whose planted pair (or triple) ranks first, per layer."""
    out = []
    for kind, rec in res["kinds"].items():
        for m in ("exact", "grad", "ig", "exact_triple"):
            if m in rec:
                r = rec[m]
                out.append(f"{kind:6s} {m:12s} planted {'triple' if m == 'exact_triple' else 'pair'} first: " + "  ".join(
                    f"L{layer} {t['value']:.2f}" for layer, t in zip(r["layers"], r["top1"])) + f"  (n={r['n']})")
    return out


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m interp.organism.variant", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="continue the aligned organism on its alignment data + distributed tasks")
    t.add_argument("--out", default="runs/organism-distributed", help="output folder (default %(default)s)")
    t.add_argument("--base", help="the aligned checkpoint to continue (default: the shipped one)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=cli.positive)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_train)
    e = sub.add_parser("evaluate", help="refusal at the decision: harmful distributed tasks vs their twins")
    e.add_argument("--checkpoint", help="a variant checkpoint folder (default: the shipped one)")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--n-per-kind", type=cli.positive, default=20, help="cases per (scheme, kind) (default 20)")
    e.add_argument("--no-world", action="store_true", help="skip the world's own tasks")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_evaluate)
    x = sub.add_parser("interactions", help="whether interaction attribution ranks the planted pieces first")
    x.add_argument("--checkpoint", help="a variant checkpoint folder (default: the shipped one)")
    x.add_argument("--split", default="test", choices=("train", "validation", "test"))
    x.add_argument("--n-per-kind", type=cli.positive, default=10, help="cases per (scheme, kind) (default 10)")
    x.add_argument("--baseline", default="mean", choices=tuple(BASELINES),
                   help="mean ablation, or patching from each task's null twin (default %(default)s)")
    x.add_argument("--scale", default="raw", choices=("raw", "sigmoid"),
                   help="interactions of the logit difference (raw) or of its sigmoid (default %(default)s)")
    x.add_argument("--out", type=Path, default=Path("runs/distributed/interactions.json"))
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(fn=_interactions)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(_parser(), lambda args: args.fn(args), argv)


if __name__ == "__main__":
    sys.exit(main())
