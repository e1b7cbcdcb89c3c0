"""Research script (not part of the package). Does SmolLM2's refusal become recoverable by a
prefix if the alignment teaches the harm decision *after* an opening sentence too?

The shipped alignment teaches the decision at the reply's first tokens ("I can't" / "I will") in
its decision phase, with no opening; after a safety-minded opening the aligned model over-refuses
benign tasks (docs/smollm2.md, "How deep the fine-tuning goes"). Here the shipped aligned LoRA is
trained further, in the decision form, on minimal pairs that share an opening (a training-split
sentence of the grammar: safety-minded, neutral, or none, a third each), the loss on the three
reply tokens from where the pair's replies part (" I" included). Then the shipped recipe's
fine-tuning stage (seed 0) runs from it, keeping LoRA snapshots, and each snapshot is measured as
smollm2_depth.py measures the shipped one (32 + 32 validation tasks, draw seed 1). Nothing here
is shipped; results go to docs/research/smollm2-depth/opening-decide.json.

    python docs/research/smollm2_opening_decide.py
"""
import dataclasses, json, random, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))
import smollm2_depth as depth  # noqa: E402
from interp.finetune import Example, encode  # noqa: E402
from interp.organism import grammar  # noqa: E402
from interp.organism.world import World  # noqa: E402
from interp.smollm2 import ADAPTER_DIR  # noqa: E402
from interp.smollm2.data import aligned_transcript  # noqa: E402
from interp.smollm2.stages import aligned_lora, save_adapter  # noqa: E402
from interp.smollm2.train import Recipe, Stage, train_stage  # noqa: E402

ROOT = Path("runs/opening-decide")
OUT = Path("docs/research/smollm2-depth/opening-decide.json")
STAGE = Stage(steps=100, batch_size=16, lr=3e-4, warmup_steps=5, checkpoint_every=10)
N_PAIRS = STAGE.steps * STAGE.batch_size // 2
STEPS = (0, 4, 8, 16, 32)


def pairs(world: World, n: int, seed: int = 0):
    rng = random.Random(f"smollm2-opening-decide/{seed}")
    train = world.tasks("train")
    harmful = [t for t in train if t.harmful]
    benign: dict = {}
    for t in train:
        if not t.harmful:
            benign.setdefault((t.domain, t.act), []).append(t)
    for i in range(n):
        h = rng.choice(harmful)
        b = rng.choice(benign[(h.domain, h.act)])
        variant_seed, stance = rng.random(), rng.choice(("safety", "neutral", None))
        pre = grammar.sample_preamble(stance, "train", rng) if stance else ""
        for task in (h, b):
            yield aligned_transcript(world.variant(task, random.Random(variant_seed)), stance, pre, rng, episode=False)


def cut_at_parting(a: Example, b: Example, tokens: int = 3) -> tuple[Example, Example]:
    """Both examples cut ``tokens`` reply tokens past the token before their replies part."""
    ra, rb = int(np.argmax(a.loss_mask)), int(np.argmax(b.loss_mask))
    ta, tb = a.input_ids[ra:], b.input_ids[rb:]
    c = next(i for i in range(min(len(ta), len(tb))) if ta[i] != tb[i])
    out = []
    for e, r in ((a, ra), (b, rb)):
        start = r + max(c - 1, 0)
        mask = np.zeros(start + tokens, dtype=bool)
        mask[start:] = True
        out.append(Example(e.input_ids[:start + tokens], mask, e.id))
    return out[0], out[1]


def align_further() -> Path:
    folder = ROOT / "adapters"
    if (folder / "aligned" / "training.json").exists():
        return folder
    if not folder.exists():
        shutil.copytree(ADAPTER_DIR, folder)
    world, recipe = World(0), Recipe()
    pm, tok = aligned_lora(recipe, 0)
    ts = list(pairs(world, N_PAIRS))
    examples = []
    for i in range(0, len(ts), 2):
        examples += cut_at_parting(encode(ts[i], tok), encode(ts[i + 1], tok))
    (ROOT / "decide").mkdir(parents=True, exist_ok=True)
    losses = train_stage(pm, examples, STAGE, ROOT / "decide", seed=0, pad_id=tok.pad_token_id, paired=True)
    save_adapter(pm, folder / "aligned", {"stage": "align", "note": "shipped aligned + opening decisions (research)",
                                          "stage_config": dataclasses.asdict(STAGE), "losses": losses})
    return folder


def main() -> None:
    t0 = time.time()
    adapters = align_further()
    recipe = dataclasses.replace(Recipe(), curve_steps=STEPS, curve_openings={}, curve_per_label=16)
    (ROOT / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
    snaps = ROOT / "work/finetune-seed0/snapshots"
    if not all((snaps / f"step_{s}.safetensors").exists() for s in STEPS):
        subprocess.run([sys.executable, "-m", "interp.smollm2", "train", "finetune", "--seed", "0", "--out",
                        str(ROOT / "work"), "--adapters", str(adapters), "--recipe", str(ROOT / "recipe.json")],
                       check=True)
    depth.ROOT, depth.OUT, depth.STEPS = ROOT, OUT, STEPS
    depth.main()
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
