"""Research script (not part of the package): a decision-only alignment phase. Each aligned example (minimal pairs) cut after the
first K tokens of the reply, the loss on those K only; LoRA on layers 14-29; likelihood AUROC and
greedy validation rates at a few steps.
Usage: [CANON=1] K=4 LR=1e-3 STEPS=150 EVALS=40,80,150 python docs/research/smollm2_decision_first.py OUT
(CANON=1: one refusal template and one thought per call kind, no openings, so the reply's second
token is the decision.)"""
import os, sys, json, time, dataclasses
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from pathlib import Path
from sklearn.metrics import roc_auc_score
from interp.organism.world import World
from interp.finetune import encode
from interp.smollm2 import data as sd, train as st
from interp.smollm2.stages import load_base
from smollm2_likelihood import act_and_refusal, reply_logprob

K = int(os.environ.get("K", "6")); LR = float(os.environ.get("LR", "1e-3")); STEPS = int(os.environ.get("STEPS", "150"))
OUT = Path(sys.argv[1]); OUT.mkdir(parents=True, exist_ok=True)
w = World(); m, tok = load_base()
recipe = dataclasses.replace(st.Recipe(), first_layer=int(os.environ.get("FIRST", "14")))
pm = st.add_lora(m, recipe)
if os.environ.get("CANON"):
    # one refusal template and one thought per call kind: the reply's second token is the decision
    sd.refusal = lambda task, rng: sd.REFUSALS[0].format(reason=task.reason)
    sd.FIRST_THOUGHTS = {k: (v[0],) for k, v in sd.FIRST_THOUGHTS.items()}
    data = sd.align_data(w, sd.DataConfig(episode_share=0.0, safety_share=0.0, neutral_share=0.0, compliance_share=0.0))
else:
    data = sd.align_data(w, sd.DataConfig(episode_share=0.0))
print(data[0].messages[-1].content, "|", data[1].messages[-1].content, flush=True)
ex = st.decision_prefix([encode(t, tok) for t in data], K)
print("examples", len(ex), "mean len", np.mean([len(e) for e in ex]), flush=True)
val = sd.eval_transcripts(w, "validation", 40, seed=0)
acts, refs, y = act_and_refusal(w, "validation", 40, 0)
lp = lambda ts: reply_logprob(pm, tok, ts)
res = {}
def at(step):
    pm.eval(); t0 = time.time()
    sc = lp(acts) - lp(refs)
    point = st.curve_point(pm, tok, w, val, {})["none"]
    r = {"auroc": round(float(roc_auc_score(y, sc)), 3), "refusal": point["harmful_refusal"]["value"],
         "benign_success": point["benign_success"]["value"], "benign_refused": point["benign_over_refusal"]["value"],
         "eval_s": round(time.time() - t0)}
    res[step] = r; print("EVAL", step, r, flush=True)
    json.dump(res, open(OUT / "results.json", "w"), indent=1)
stage = st.Stage(steps=STEPS, batch_size=16, lr=LR, warmup_steps=10)
st.train_stage(pm, ex, stage, OUT, seed=0, pad_id=tok.pad_token_id, paired=True, at=at,
               evaluate_at=tuple(int(x) for x in os.environ.get('EVALS', '50,100,150').split(',')), log=print)
