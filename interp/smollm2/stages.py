"""The two training stages of SmolLM2's adapters as resumable runs (:mod:`interp.smollm2.train`
holds the mechanics and the recipe).

A run's working folder (``--out``) holds, per stage, ``recipe.json`` (a resumed run must be given
the same recipe), ``state.pt`` (the resumable checkpoint), ``snapshots/`` (the LoRA at each
evaluated step), ``curve.json`` (validation rates by step) and ``log.txt``. The finished adapter
is written to ``adapters/<folder>`` (by default the package's shipped folder), with a
``training.json`` saying how it was made: the recipe, the command, the curve, the chosen step
and the rule that chose it, the losses and the time.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from interp.atomic import atomic_path, read_json, save_json
from interp.finetune import encode
from interp.organism.world import World
from interp.smollm2 import ADAPTER_DIR, ADAPTERS
from interp.smollm2.data import align_data, decision_data, eval_transcripts, finetune_data
from interp.smollm2.train import (SELECTION_RULE, Recipe, add_lora, choose_step, curve_point, decision_prefix, lora_state,
                                  save_adapter, set_lora_state, train_stage)


def load_base() -> tuple[Any, Any]:
    """The converted base model (hf, sdpa attention, float32) and its tokenizer."""
    from interp.models import load_model

    handle = load_model("smollm2", attn_implementation="sdpa")
    return handle.hf_model, handle.tokenizer


def _folder(out: Path, name: str, recipe: Recipe) -> Path:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.json"
    if path.exists():
        if read_json(path) != recipe.to_dict():
            raise ValueError(f"{path}: this run folder was started with another recipe; "
                             "use a new --out or the same recipe")
    else:
        save_json(recipe.to_dict(), path)
    return folder


def _logger(folder: Path) -> Callable[[str], None]:
    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(folder / "log.txt", "a") as f:
            f.write(line + "\n")
    return log


def _curve(folder: Path) -> dict[str, Any]:
    path = folder / "curve.json"
    return read_json(path) if path.exists() else {}


def _evaluator(peft_model: Any, tokenizer: Any, world: World, recipe: Recipe, folder: Path, openings: bool,
               log: Callable[[str], None]) -> Callable[[int], None]:
    """What runs at an evaluated step: the LoRA saved to ``snapshots/step_N``, the validation
    rates (and with ``openings`` the curve's openings) added to ``curve.json``."""
    val = eval_transcripts(world, "validation", recipe.curve_per_label, seed=0)

    def at(step: int) -> None:
        t0 = time.time()
        (folder / "snapshots").mkdir(exist_ok=True)
        with atomic_path(folder / "snapshots" / f"step_{step}.safetensors") as tmp:
            save_file(lora_state(peft_model), str(tmp))
        point = curve_point(peft_model, tokenizer, world, val, recipe.curve_openings if openings else {})
        curve = _curve(folder)
        curve[str(step)] = {"step": step, **point, "eval_s": round(time.time() - t0, 1)}
        save_json(curve, folder / "curve.json")
        summary = {k: tuple(round(v[r]["value"], 3) for r in ("harmful_refusal", "benign_success", "benign_over_refusal"))
                   for k, v in point.items()}
        log(f"step {step} validation (refusal, benign success, benign refused): {summary}")
    return at


def _metadata(stage: str, recipe: Recipe, losses: list[float], t0: float, command: list[str],
              **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "recipe": recipe.to_dict(), "command": shlex.join(["python", "-m", "interp.smollm2",
                                                                                "train", *command]),
            "losses": [round(x, 5) for x in losses], "wall_s_this_session": round(time.time() - t0, 1), **extra}


def run_align(recipe: Recipe, out: str | Path, adapters: str | Path = ADAPTER_DIR) -> Path:
    """Stage 1: train the aligned LoRA, the decision phase then the reply phase (each resumable
    in its own sub-folder of ``out/align``); write ``adapters/aligned``."""
    t0 = time.time()
    folder = _folder(Path(out), "align", recipe)
    world = World(recipe.data.world_seed)
    model, tok = load_base()
    pm = add_lora(model, recipe, seed=recipe.data.seed)
    losses = {}
    for phase in ("decide", "reply"):
        sub = folder / phase
        sub.mkdir(exist_ok=True)
        log = _logger(sub)
        if phase == "decide":
            data, stage, steps = decision_data(world, recipe.data), recipe.decide, recipe.decide_eval_steps
            examples = decision_prefix([encode(t, tok) for t in data], recipe.decide_tokens)
            decision = (0, 1.0)
        else:
            data, stage, steps = align_data(world, recipe.data), recipe.align, recipe.align_eval_steps
            examples = [encode(t, tok) for t in data]
            decision = (recipe.decision_tokens, recipe.decision_weight)
        log(f"align/{phase}: {len(data)} examples, {stage.steps} steps of {stage.batch_size}")
        at = _evaluator(pm, tok, world, recipe, sub, openings=False, log=log)
        losses[phase] = train_stage(pm, examples, stage, sub, seed=recipe.data.seed, pad_id=tok.pad_token_id,
                                    decision=decision, paired=True, at=at, evaluate_at=steps, log=log)
    meta = _metadata("align", recipe, losses["reply"], t0, ["align", "--out", str(out)],
                     decide_losses=[round(x, 5) for x in losses["decide"]],
                     validation={phase: _curve(folder / phase) for phase in ("decide", "reply")})
    return save_adapter(pm, Path(adapters) / ADAPTERS["smollm2-aligned"].folder, meta)


def aligned_lora(recipe: Recipe, seed: int, adapters: str | Path = ADAPTER_DIR) -> tuple[Any, Any]:
    """Where fine-tuning starts: the base model with a trainable LoRA (initialised with ``seed``)
    holding the aligned adapter's weights, and the tokenizer."""
    from peft import set_peft_model_state_dict

    aligned = Path(adapters) / ADAPTERS["smollm2-aligned"].folder / "adapter_model.safetensors"
    if not aligned.is_file():
        raise FileNotFoundError(f"{aligned}: train the aligned adapter first (python -m interp.smollm2 train align)")
    model, tok = load_base()
    pm = add_lora(model, recipe, seed=seed)
    set_peft_model_state_dict(pm, load_file(str(aligned)))
    return pm, tok


def run_finetune(recipe: Recipe, seed: int, out: str | Path, adapters: str | Path = ADAPTER_DIR) -> Path:
    """Stage 2 for ``seed``: continue the aligned LoRA on benign trajectories, score the
    validation curve, keep the step :data:`SELECTION_RULE` chooses; write the adapter folder."""
    t0 = time.time()
    name = "smollm2-finetuned" if seed == 0 else f"smollm2-finetuned-seed{seed}"
    if name not in ADAPTERS:
        raise ValueError(f"no adapter name for fine-tuning seed {seed} (expected one of 0, 1)")
    pm, tok = aligned_lora(recipe, seed, adapters)
    folder = _folder(Path(out), f"finetune-seed{seed}", recipe)
    log = _logger(folder)
    world = World(recipe.data.world_seed)
    data = finetune_data(world, seeded_recipe(recipe, seed).data)
    log(f"finetune seed {seed}: {len(data)} benign examples, {recipe.finetune.steps} steps")
    examples = [encode(t, tok) for t in data]
    at = _evaluator(pm, tok, world, recipe, folder, openings=True, log=log)
    losses = train_stage(pm, examples, recipe.finetune, folder, seed=seed, pad_id=tok.pad_token_id,
                         decision=(recipe.decision_tokens, recipe.decision_weight), at=at,
                         evaluate_at=recipe.curve_steps, log=log)
    curve = _curve(folder)
    points = [curve[str(s)] for s in recipe.curve_steps]
    step, clause = choose_step(points, recipe.select_drop, recipe.select_benign_floor)
    log(f"chosen step {step} (rule clause {clause})")
    set_lora_state(pm, load_file(str(folder / "snapshots" / f"step_{step}.safetensors")))
    meta = _metadata("finetune", recipe, losses, t0, ["finetune", "--seed", str(seed), "--out", str(out)], seed=seed,
                     rule=SELECTION_RULE, chosen_step=step, chosen_by=clause, validation=curve)
    return save_adapter(pm, Path(adapters) / ADAPTERS[name].folder, meta)


def seeded_recipe(recipe: Recipe, seed: int) -> Recipe:
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seed=seed))


def curve_record(name: str = "smollm2-finetuned", adapters: str | Path = ADAPTER_DIR) -> dict[str, Any]:
    """A fine-tuned adapter's validation curve (its ``training.json``) in the form of the
    organism's ``curve.json``, which figure F2 draws: rates per step and forced opening, the
    chosen step and the rule that chose it."""
    meta = read_json(Path(adapters) / ADAPTERS[name].folder / "training.json")
    if meta.get("stage") != "finetune":
        raise ValueError(f"{name}: not a fine-tuned adapter (its training.json is of stage {meta.get('stage')!r})")
    recipe = meta["recipe"]
    points = sorted(meta["validation"].values(), key=lambda p: p["step"])
    return {"split": "validation", "mode": "first_step", "n_per_label": recipe["curve_per_label"],
            "prefixes": {"none": None, **recipe["curve_openings"]},
            "points": [{k: v for k, v in p.items() if k != "eval_s"} for p in points],
            "chosen_step": meta["chosen_step"], "rule": meta["rule"], "seed": meta["seed"]}
