"""Research script (not part of the package). Is the harm label linearly readable from the frozen base model's decision-position residual
with as many distinct training tasks as the adapters saw? (1,600 train, 400 validation)"""
import sys, time, numpy as np, torch
torch.set_num_threads(2)
import interp, probes
from interp.organism.world import World
from interp.smollm2.data import eval_transcripts
from interp.positions import decision
t0 = time.time()
w = World()
m = interp.load_model("smollm2", attn_implementation="sdpa")
tr = eval_transcripts(w, "train", 800, seed=1)
va = eval_transcripts(w, "validation", 200, seed=0)
layers = [6, 10, 14, 18, 22, 26, 29]
def feats(ts):
    acts = interp.cache_activations(m, ts, layers=layers, positions="decision", batch_size=32, progress=False)
    return acts.where(selector=decision()).stack().float()
Xtr, Xva = feats(tr), feats(va)
ytr = np.array([t.labels["harmful"] for t in tr]); yva = np.array([t.labels["harmful"] for t in va])
print("cached", round(time.time() - t0), "s", Xtr.shape, flush=True)
perm = np.random.default_rng(0).permutation(len(tr))
ax = 1 if Xtr.shape[1] == len(tr) else 0
for n in (200, 800, 1600):
    idx = perm[:n]
    p = probes.LayerProbes(C=1.0, layers=layers).fit(Xtr[:, idx] if ax else Xtr[idx], ytr[idx])
    print(n, {l: round(a, 3) for l, a in zip(layers, p.score_layers(Xva, yva))}, flush=True)
