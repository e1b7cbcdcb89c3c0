"""Research script (not part of the package). Why does no SmolLM2 adapter finish an episode, and
does opening the second thought with "I will" fix it?

The shipped adapters' second reply repeats a first-step sentence ("I will open X first.") and
writes a malformed call (docs/smollm2.md, "Whole episodes"). The decision phase trained every
assistant turn it saw to open "I can't" / "I will"; the second thought opens "The page is open
and ..." / "Found it: ...". Two arms, each continuing the shipped aligned LoRA for the same steps
on the same minimal pairs (a harmful task's refusal, the benign twin's whole episode), with the
reply phase's loss; they differ only in the second thought's wording:

- ``control``: the shipped wording ("The page is open and the post box is e28, so I will type
  the post there.");
- ``i-will``: the same content opening "I will" ("I will use e28, the post box, and type the
  post there.").

A third arm, ``control-120``, trains four times as long with the shipped wording (960 more
episodes). Each is scored on 32 + 32 validation tasks, first step and whole episodes. Nothing is shipped;
results in docs/research/smollm2-depth/episode-fix.json.

    python docs/research/smollm2_episode_fix.py     # about 40 minutes on two cores
"""
import dataclasses, json, sys, time
from pathlib import Path

import torch

torch.set_num_threads(2)
import interp.smollm2.data as data  # noqa: E402
from interp.behavior import evaluate  # noqa: E402
from interp.finetune import encode  # noqa: E402
from interp.organism.world import World  # noqa: E402
from interp.smollm2.stages import aligned_lora  # noqa: E402
from interp.smollm2.train import Recipe, Stage, train_stage  # noqa: E402

ROOT, OUT = Path("runs/episode-fix"), Path("docs/research/smollm2-depth/episode-fix.json")
STAGE = Stage(steps=30, batch_size=16, lr=3e-4, warmup_steps=3, checkpoint_every=5)
LONG = dataclasses.replace(STAGE, steps=120)
WORDINGS = {
    "control": dict(data.SECOND_THOUGHTS),
    "i-will": {"web": "I will use {id}, {target}, and {action}.", "code": "I will use {what} {id} and {action}."},
}


ARMS = {"control": ("control", STAGE), "i-will": ("i-will", STAGE), "control-120": ("control", LONG)}
"""Each arm: the wording and the steps (``control-120``: four times as many episodes)."""


def arm(name: str, world: World, recipe: Recipe) -> dict:
    wording, stage = ARMS[name]
    data.SECOND_THOUGHTS.clear()
    data.SECOND_THOUGHTS.update(WORDINGS[wording])
    cfg = dataclasses.replace(recipe.data, align_examples=stage.steps * stage.batch_size, safety_share=0.0,
                              neutral_share=0.0, compliance_share=0.0, episode_share=1.0)
    ts = data.align_data(world, cfg, stream="smollm2-episode-fix")
    pm, tok = aligned_lora(recipe, 0)
    folder = ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    losses = train_stage(pm, [encode(t, tok) for t in ts], stage, folder, seed=0, pad_id=tok.pad_token_id,
                         decision=(recipe.decision_tokens, recipe.decision_weight), paired=True)
    train_s = time.time() - t0
    pm.eval()
    tasks = data.eval_transcripts(world, "validation", 32, seed=1)
    out = {"wording": WORDINGS[wording], "steps": stage.steps, "train_s": round(train_s), "losses": [round(x, 4) for x in losses]}
    for mode in ("first_step", "episode"):
        with torch.no_grad():
            ev = evaluate(pm, world, tasks, tok, mode=mode, batch_size=64,
                          **({"early_stop": True} if mode == "first_step" else {}))
        out[mode] = {k: v.to_dict() for k, v in ev.rates.items()}
        if mode == "episode":
            out["examples"] = [[m.content + "".join(f" <{c.name} {dict(c.arguments)}>" for c in m.tool_calls)
                                for m in o.transcript.messages if m.role == "assistant"]
                               for o in ev.outcomes if not o.harmful][:4]
        print(name, mode, {k: round(v.value, 3) for k, v in ev.rates.items()}, flush=True)
    return out


def main() -> None:
    world, recipe = World(0), Recipe()
    res = json.loads(OUT.read_text()) if OUT.exists() else {"split": "validation", "n_per_label": 32, "draw_seed": 1,
                                                           "stage": dataclasses.asdict(STAGE), "arms": {}}
    for name in sys.argv[1:] or list(ARMS):
        if name not in res["arms"]:
            res["arms"][name] = arm(name, world, recipe)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
