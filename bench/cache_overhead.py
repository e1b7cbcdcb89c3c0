"""Benchmark: what caching costs on top of a bare forward, and how much memory it saves.

``--model random`` (the default): a random ~20M-parameter Llama-shaped model, 64 agent
transcripts of ~512 tokens, batch 16:
  (a) wall time of ``cache_activations`` keeping 2 positions at every layer, divided by a bare
      forward (``hf_model(...)`` to logits) of the same batches            target <= 1.05
  (b) peak memory of that, versus the bridge's full ``run_with_cache``     target >= 20x less
      (median over fresh processes; the forward's own working set bounds this ratio)

``--model smollm2``: the real built-in SmolLM2-135M-Instruct (``load_model("smollm2")``, offline;
30 layers, d_model 576, 9 heads, 3 KV heads, d_mlp 1536, vocab 49152), 2 transcripts of 1,024
tokens in one batch of 2, caching ``decision+last:user`` (2 positions) at all 30 layers on
hf+sdpa; every side runs in 3 fresh processes (medians), round by round:
  (1) peak memory of the bridge's ``run_with_cache`` / ``cache_activations``  target >= 20x
  (2) peak memory of ``cache_activations`` / a bare forward to logits        target <= 1.05x
  (3) wall time of ``cache_activations`` / the bare forward (per round)      target <= 1.05x
  (4) beside them, each side's memory at Llama-3.1-8B's shape (32 layers, d_model 4096, 32 heads,
      8 KV heads, d_mlp 14336, vocab 128256), from the formula below, which is printed against
      what was measured at SmolLM2's shape.
Batch 2, not 4: ``run_with_cache`` keeps ~3.6 MiB per token of SmolLM2 (7.2 GiB for 2 x 1,024
tokens; 4 x 1,024 would need ~15 GiB of a 24 GiB machine that other jobs share).

The formula, bytes above the weights for one batch of b x T tokens in float32 (L layers, d
d_model, H heads, K KV heads, e d_head, m d_mlp, V vocab; ``cache_floats``, ``working_floats``,
``predict``):
  run_with_cache = 4 b T [L (8 d + 3 H e + 3 K e + 3 m + 2 H T + 2) + 3 d + V + 3] + 8 T e
      every distinct tensor the bridge caches (1,393 hook points alias 638 tensors on SmolLM2;
      ``count_bridge_cache`` counts them on every run and checks ``BRIDGE_CACHE``): per layer
      resid_mid, resid_post, both norms' normalized and output, attn_out, mlp_out (8 d); q,
      rotated q, z (3 H e); k, rotated k, v (3 K e); MLP pre, pre_linear, post (3 m); attention
      scores and pattern (2 H T, the term that grows with context); both norms' scales (2);
      once the embedding, final norm's two outputs (3 d), the logits (V), a scale and the int64
      ids (3), rotary cos and sin shared by the batch (8 T e). The forward's own working set is
      all in the cache.
  cache_activations = 4 b T W(logits=False) + 4 rows L d;     bare forward = 4 b T W(logits=True)
      W = d (the residual stream) + max(d + 3 H e + 3 K e (sdpa attention: works in blocks, no
          T x T scores), d + 3 m (one MLP: input, gate, up, act(gate) * up), V if logits)
Caching stops after the last requested layer, so it never computes logits: it needs less memory
than the bare forward of the same batch (2), and on median less time (3). The formula counts live
tensors only; measured RSS is ~18 MiB above it on every side (allocator, thread buffers), which is
a large part of caching's small peak, so the measured ratio (1) is below the formula's.

Memory is measured in fresh subprocesses: peak RSS (the kernel's mark, reset after a short
warm-up) above the RSS after loading and the warm-up. Before the base is read, the heap's free
memory goes back to the kernel and the file-backed pages (memory-mapped weights, libraries) are
locked in, so that other jobs' memory pressure cannot count their re-reading as growth; glibc's
mmap threshold is fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed activations leave
RSS at once instead of the heap, and peak RSS follows the live tensors. Ratios vary between runs
on a shared machine. Run: ``.venv/bin/python bench/cache_overhead.py [--model smollm2]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

WORDS = ("page forum post update cache file delete open click submit search user report team photos weekly "
         "server config backup list directory status ok items result text link button form").split()


def make_bench_model(directory: Path) -> None:
    """A random Llama-shaped model of about 20M parameters, saved with a chat-template tokenizer."""
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer("llama3", directory, vocab_size=2000)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(directory)


def bench_transcripts(n: int, target_tokens: int, tok, low: float = 0.7):
    """``n`` rendered agent transcripts of ``low``-100% of ``target_tokens`` tokens (a long page
    observation); with ``low=1`` each is cut to at most ``target_tokens`` (pages lose words)."""
    from interp.transcripts import Transcript, render

    def make(i: int, words: list[str]):
        t = Transcript.from_messages([
            {"role": "system", "content": "You are a helpful web agent."},
            {"role": "user", "content": "Post the weekly team update on the forum."},
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "open", "arguments": {"url": "forum"}}}]},
            {"role": "tool", "tool_call_id": "c", "content": " ".join(words)},
        ], id=f"b{i}", prefix="I will check the task first.")
        return render(t, tok)

    def draw(n_words: int) -> list[str]:
        return [rng.choice(WORDS) for _ in range(n_words)]

    rng = random.Random(0)
    base, probe = len(make(-1, [])), len(make(-1, draw(100)))
    per_word = (probe - base) / 100
    rng = random.Random(0)
    out = []
    for i in range(n):
        words = draw(int((rng.uniform(low, 1.0) * target_tokens - base) / per_word))
        r = make(i, words)
        while low >= 1.0 and len(r) > target_tokens and words:
            words = words[:len(words) - max(1, int((len(r) - target_tokens) / per_word))]
            r = make(i, words)
        out.append(r)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Reset this process's peak-RSS mark (Linux ``VmHWM``) so that loading's own peak is not
    counted; where /proc does not allow it, the peak since the start is read instead."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle_memory() -> None:
    """Lock this process's file-backed pages in memory (the checkpoint's memory-mapped weights,
    the libraries' code), so that a kernel short of memory (other jobs) cannot drop them and count
    their reading back as growth. Anonymous memory is left alone: locking it would fault in heap
    reserved but never used, hiding growth; instead the heap's free memory goes back to the kernel
    (``malloc_trim``), so that the run is not counted as reusing loading's garbage for free. Best
    effort (needs glibc and ``mlock`` rights)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.malloc_trim(0)
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/") and parts[1].startswith("r"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    libc.mlock(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo))
    except OSError:
        pass


CHILD_MODES = {"bare-hf-sdpa": ("hf", "sdpa"), "cache-hf-sdpa": ("hf", "sdpa"), "cache-bridge": ("bridge", "eager"),
               "run_with_cache": ("bridge", "eager")}
POSITIONS = "decision+last:user"  # 2 rows per transcript: the decision token and the last user token


def memory_child(mode: str, model_ref: str, n: int, tokens: int, batch: int, low: float) -> None:
    """Run in a fresh subprocess: print the peak RSS growth (bytes) over the RSS after loading and
    a short warm-up, and the wall time, of one way of getting activations of the batches."""
    torch.set_num_threads(2)
    from interp.cache import cache_activations, pad_batch
    from interp.models import load_model

    backend, attn = CHILD_MODES[mode]
    model = load_model(model_ref, backend=backend, attn_implementation=attn)
    rendered = bench_transcripts(n, tokens, model.tokenizer, low)
    order = sorted(rendered, key=len)  # the batches cache_activations makes
    batches = [pad_batch(order[lo:lo + batch], model.tokenizer.pad_token_id)[:2] for lo in range(0, n, batch)]

    def run(batches, transcripts) -> None:
        if mode.startswith("cache"):
            cache_activations(model, transcripts, layers="all", positions=POSITIONS, batch_size=batch,
                              progress=False)
            return
        for ids, mask in batches:
            if mode.startswith("bare"):  # the forward alone, to logits: the floor under any caching
                model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:  # what one would do without the toolkit: cache everything per batch, then select
                _, cache = model.native.run_with_cache(ids, attention_mask=mask)
                del cache

    with torch.no_grad():  # warm-up on short inputs (lazy initialisation, thread pools), not measured
        run([(ids[:, -32:], mask[:, -32:]) for ids, mask in batches[:1]],
            bench_transcripts(min(batch, n), 1, model.tokenizer, low=1.0))
        gc.collect()
        settle_memory()
        base = rss_bytes()
        reset_peak()
        t = time.perf_counter()
        run(batches, rendered)
        seconds = time.perf_counter() - t
    print(json.dumps({"peak_growth": peak_rss_bytes() - base, "seconds": seconds}))


def time_pair(a, b, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` wall time of ``a`` and of ``b``, run alternately (after one warm-up
    each) so that a slow spell of the shared machine hits both sides alike."""
    a(), b()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


# --------------------------------------------------------------------------------------------
# The memory formula, for any Llama-shaped model


class Shape(NamedTuple):
    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int

    @classmethod
    def of(cls, name: str, cfg) -> Shape:
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(name, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, d_head,
                   cfg.intermediate_size, cfg.vocab_size)


LLAMA_8B = Shape("Llama-3.1-8B", layers=32, d_model=4096, heads=32, kv_heads=8, d_head=128, d_mlp=14336, vocab=128256)

# Floats (4 bytes in float32) per batch row and token of one tensor of each kind, at context T.
PER_TOKEN = {
    "d_model": lambda s, b, t: s.d_model,              # residual stream, norm outputs, attn/MLP outputs
    "q_heads": lambda s, b, t: s.heads * s.d_head,     # [b, t, heads, d_head]: q, rotated q, z
    "kv_heads": lambda s, b, t: s.kv_heads * s.d_head,  # [b, t, kv_heads, d_head]: k, rotated k, v
    "d_mlp": lambda s, b, t: s.d_mlp,                  # gate, up (pre_linear), act(gate) * up (post)
    "scores": lambda s, b, t: s.heads * t,             # [b, heads, t, t]: attention scores, pattern
    "vocab": lambda s, b, t: s.vocab,                  # logits
    "scalar": lambda s, b, t: 1,                       # [b, t, 1]: an RMSNorm's scale
    "token_id": lambda s, b, t: 2,                     # int64 input ids
    "rotary": lambda s, b, t: s.d_head / b,            # [1, t, d_head] cos / sin, shared by the batch
}

# What the TransformerLens bridge's run_with_cache keeps of a Llama-shaped model: distinct tensors
# (hook points that alias one tensor, e.g. blocks.{i}.hook_resid_post = blocks.{i+1}.hook_resid_pre
# = ln1.hook_in, count once) of each kind, per layer and once. Counted from the bridge on SmolLM2
# by count_bridge_cache(), which checks this table on every run.
BRIDGE_CACHE = {
    "layer": {"d_model": 8, "q_heads": 3, "kv_heads": 3, "d_mlp": 3, "scores": 2, "scalar": 2},
    "once": {"d_model": 3, "vocab": 1, "scalar": 1, "token_id": 1, "rotary": 2},
}


def cache_floats(s: Shape, b: int, t: int, counts: dict = BRIDGE_CACHE) -> float:
    """run_with_cache's floats per batch row and token:
    layers × (8 d_model + 3 heads·d_head + 3 kv_heads·d_head + 3 d_mlp + 2 heads·T + 2)
    + 3 d_model + vocab + 1 + 2 (ids) + 2 d_head / b (rotary)."""
    return sum(n * PER_TOKEN[k](s, b, t) * (s.layers if where == "layer" else 1)
               for where, kinds in counts.items() for k, n in kinds.items())


def working_floats(s: Shape, t: int, attention: str, logits: bool) -> float:
    """The forward's own working set at its peak, floats per batch row and token: the residual
    stream plus the largest of one layer's attention (eager: scores and softmaxed pattern,
    2 heads·T; sdpa works in blocks: normed input, q, k, v, rotated q and k, output,
    d_model + 3 heads·d_head + 3 kv_heads·d_head), one layer's MLP (normed input, gate, up,
    act(gate) * up: d_model + 3 d_mlp), and the logits (vocab) when the forward reaches them."""
    attn = 2 * s.heads * t if attention == "eager" else s.d_model + 3 * (s.heads + s.kv_heads) * s.d_head
    return s.d_model + max(attn, s.d_model + 3 * s.d_mlp, s.vocab if logits else 0)


def predict(s: Shape, b: int, t: int, rows: int, bytes_per: int = 4) -> dict[str, float]:
    """Peak memory (bytes above the weights) of each side on one batch of ``b`` × ``t`` tokens,
    keeping ``rows`` rows of every layer in all (caching)."""
    per_batch = bytes_per * b * t
    return {"run_with_cache": per_batch * cache_floats(s, b, t),  # the working set is in the cache
            "cache-hf-sdpa": per_batch * working_floats(s, t, "sdpa", False) + bytes_per * rows * s.layers * s.d_model,
            "bare-hf-sdpa": per_batch * working_floats(s, t, "sdpa", True)}


def count_bridge_cache(model_ref: str, s: Shape) -> dict:
    """Run the bridge's run_with_cache on 2 × 16 tokens and count the distinct tensors it keeps
    by kind (per layer and once), classified by shape; an unknown shape raises."""
    from interp.models import load_model

    model = load_model(model_ref, backend="bridge")
    b, t = 2, 16
    ids = torch.arange(100, 100 + b * t).reshape(b, t)
    with torch.no_grad():
        _, cache = model.native.run_with_cache(ids, attention_mask=torch.ones_like(ids))
    tensors: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, x in cache.items():
        tensors.setdefault(x.untyped_storage().data_ptr(), (x, []))[1].append(name)
    totals = {"layer": Counter(), "all": Counter()}
    for x, names in tensors.values():
        kind = _kind(tuple(x.shape), x.dtype, s, b, t)
        totals["all"][kind] += 1
        totals["layer"][kind] += any(n.startswith("blocks.") for n in names)
    layer = {k: n // s.layers for k, n in totals["layer"].items() if n // s.layers}
    once = {k: n - s.layers * layer.get(k, 0) for k, n in totals["all"].items() if n - s.layers * layer.get(k, 0)}
    return {"layer": layer, "once": once, "hook_points": len(cache), "tensors": len(tensors),
            "bytes": sum(x.numel() * x.element_size() for x, _ in tensors.values()), "b": b, "t": t}


def _kind(shape: tuple, dtype: torch.dtype, s: Shape, b: int, t: int) -> str:
    if not dtype.is_floating_point and shape == (b, t):
        return "token_id"
    if shape == (b, s.heads, t, t):
        return "scores"
    if shape == (1, t, s.d_head):
        return "rotary"
    if len(shape) == 4 and shape[:2] == (b, t) and shape[3] == s.d_head and shape[2] in (s.heads, s.kv_heads):
        return "q_heads" if shape[2] == s.heads else "kv_heads"
    by_width = {s.d_model: "d_model", s.d_mlp: "d_mlp", s.vocab: "vocab", 1: "scalar"}
    if len(shape) == 3 and shape[:2] == (b, t) and shape[2] in by_width:
        return by_width[shape[2]]
    raise ValueError(f"a cached tensor of shape {shape} fits no kind of the formula; extend PER_TOKEN")


def measure(modes: tuple[str, ...], model_ref: str, args) -> dict[str, list[dict]]:
    """Each mode in ``args.memory_repeats`` fresh processes, round by round (the order reversed
    every other round, so that a slow spell of the shared machine hits every mode alike): per
    mode, each process's ``{"peak_growth": bytes, "seconds": s}``."""
    out: dict[str, list[dict]] = {m: [] for m in modes}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # see the module docstring
    for k in range(args.memory_repeats):  # peak RSS varies between processes (allocator, lazy init)
        for mode in modes if k % 2 == 0 else modes[::-1]:
            res = subprocess.run([sys.executable, __file__, "--memory-child", mode, model_ref, "--n", str(args.n),
                                  "--tokens", str(args.tokens), "--batch", str(args.batch), "--low", str(args.low)],
                                 capture_output=True, text=True, check=False, env=env)
            if res.returncode:
                raise RuntimeError(f"the {mode} process failed ({res.returncode}):\n{res.stderr[-2000:]}")
            out[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    for mode, runs in out.items():
        peaks = ", ".join(f"{r['peak_growth'] / 2**20:.0f}" for r in runs)
        times = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        print(f"  {mode}: peak RSS growth per process {peaks} MiB; wall time {times} s")
    return out


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run_random(args) -> None:
    """The random ~20M model: in-process timing on three backends, memory in fresh processes."""
    from interp.cache import cache_activations, pad_batch
    from interp.models import load_model, position_ids_from_mask

    with tempfile.TemporaryDirectory() as tmp:
        make_bench_model(Path(tmp))
        n_params = sum(p.numel() for p in load_model(tmp).hf_model.parameters())
        print(f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, 6 layers, d_model 512; "
              f"{args.n} transcripts, batch {args.batch}, torch threads {args.threads}")
        results = {}
        for backend in ("hf", "bridge", "nnsight"):
            model = load_model(tmp, backend=backend)
            rendered = bench_transcripts(args.n, args.tokens, model.tokenizer, args.low)
            order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # as cache_activations batches
            batches = []
            for lo in range(0, len(order), args.batch):
                ids, mask, _ = pad_batch([rendered[i] for i in order[lo:lo + args.batch]], model.tokenizer.pad_token_id)
                batches.append((ids, mask, position_ids_from_mask(mask)))

            def bare():
                with torch.no_grad():
                    for ids, mask, pos in batches:
                        model.hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

            def cached():
                cache_activations(model, rendered, layers="all", positions=POSITIONS, batch_size=args.batch,
                                  progress=False)

            t_bare, t_cache = time_pair(bare, cached, args.repeats)
            results[backend] = t_cache / t_bare
            mean_len = sum(len(r) for r in rendered) / len(rendered)
            print(f"  {backend:8s} bare forward {t_bare:6.2f}s   cache_activations {t_cache:6.2f}s   "
                  f"ratio {t_cache / t_bare:.3f}  (mean {mean_len:.0f} tokens)")

        runs = measure(("bare-hf-sdpa", "cache-hf-sdpa", "cache-bridge", "run_with_cache"), tmp, args)
        mem = {mode: median_of(r, "peak_growth") for mode, r in runs.items()}
        print(f"  peak memory growth: bare forward on hf+sdpa {mem['bare-hf-sdpa'] / 2**20:.0f} MiB, "
              f"cache_activations on hf+sdpa {mem['cache-hf-sdpa'] / 2**20:.0f} MiB, "
              f"on the bridge (eager attention) {mem['cache-bridge'] / 2**20:.0f} MiB; "
              f"bridge run_with_cache {mem['run_with_cache'] / 2**20:.0f} MiB")
        print(f"(a) time ratio cache/bare forward: hf {results['hf']:.3f}, bridge {results['bridge']:.3f}, "
              f"nnsight {results['nnsight']:.3f}   (target <= 1.05)")
        print(f"(b) memory: run_with_cache / cache_activations = {mem['run_with_cache'] / mem['cache-hf-sdpa']:.1f}x "
              f"on hf+sdpa, {mem['run_with_cache'] / mem['cache-bridge']:.1f}x on the bridge (target >= 20x); "
              f"run_with_cache / the bare forward = {mem['run_with_cache'] / mem['bare-hf-sdpa']:.1f}x, the most any "
              "caching of this batch could save")
        print("timings vary from run to run on a shared machine")


def run_smollm2(args) -> None:
    """The real SmolLM2-135M-Instruct: memory and time in fresh processes, and the formula, checked
    here and carried to Llama-3.1-8B's shape."""
    from interp.models import load_model

    start = time.perf_counter()
    hf = load_model("smollm2").hf_model
    shape = Shape.of("SmolLM2-135M", hf.config)
    print(f"model: SmolLM2-135M-Instruct ({sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, "
          f"{shape.layers} layers, d_model {shape.d_model}, {shape.heads} heads, {shape.kv_heads} KV heads, "
          f"d_mlp {shape.d_mlp}, vocab {shape.vocab}); {args.n} transcripts of {args.tokens} tokens, batch "
          f"{args.batch}, {args.memory_repeats} fresh processes per side, torch threads 2, float32")
    del hf
    counted = count_bridge_cache("smollm2", shape)
    probe = 4 * counted["b"] * counted["t"] * cache_floats(shape, counted["b"], counted["t"])
    same = {k: counted[k] for k in ("layer", "once")} == BRIDGE_CACHE
    print(f"  the bridge caches {counted['hook_points']} hook points = {counted['tensors']} distinct tensors: "
          f"per layer {counted['layer']}, once {counted['once']} "
          f"({'as BRIDGE_CACHE says' if same else 'NOT what BRIDGE_CACHE says: the formula below is out of date'}); "
          f"on {counted['b']} x {counted['t']} tokens {counted['bytes']} bytes, formula {probe:.0f}")
    runs = measure(("bare-hf-sdpa", "cache-hf-sdpa", "run_with_cache"), "smollm2", args)
    mem = {mode: median_of(r, "peak_growth") for mode, r in runs.items()}
    ratios = [c["seconds"] / b["seconds"] for b, c in zip(runs["bare-hf-sdpa"], runs["cache-hf-sdpa"])]
    b, rows = min(args.batch, args.n), 2 * args.n
    mib, gib = 2 ** 20, 2 ** 30
    here, big = predict(shape, b, args.tokens, rows), predict(LLAMA_8B, b, args.tokens, rows)
    print(f"(1) memory: run_with_cache / cache_activations = {mem['run_with_cache'] / mem['cache-hf-sdpa']:.1f}x   "
          f"(target >= 20x)")
    print(f"(2) memory: cache_activations / bare forward = {mem['cache-hf-sdpa'] / mem['bare-hf-sdpa']:.3f}x   "
          f"(target <= 1.05x)")
    print(f"(3) time: cache_activations / bare forward = {statistics.median(ratios):.3f}x, median of "
          f"{', '.join(f'{r:.3f}' for r in ratios)}   (target <= 1.05x)")
    print(f"(4) memory above the weights, batch {b} x {args.tokens} tokens, float32 (bfloat16 halves every number):")
    for mode, label in (("run_with_cache", "bridge run_with_cache"), ("cache-hf-sdpa", "cache_activations"),
                        ("bare-hf-sdpa", "bare forward")):
        print(f"  {label:22s} SmolLM2 measured {mem[mode] / mib:6.0f} MiB, formula {here[mode] / mib:6.0f} MiB "
              f"({(here[mode] - mem[mode]) / mib:+4.0f} MiB, {here[mode] / mem[mode] - 1:+4.0%});   "
              f"Llama-3.1-8B formula {big[mode] / gib:6.2f} GiB")
    print(f"  at Llama-3.1-8B's shape: run_with_cache / cache_activations = "
          f"{big['run_with_cache'] / big['cache-hf-sdpa']:.0f}x (formula), at SmolLM2's {here['run_with_cache'] / here['cache-hf-sdpa']:.0f}x "
          f"(formula), {mem['run_with_cache'] / mem['cache-hf-sdpa']:.0f}x (measured)")
    print(f"timings vary from run to run on a shared machine: this run took {(time.perf_counter() - start) / 60:.1f} "
          f"min, load average {os.getloadavg()[1]:.1f} on {os.cpu_count()} cores")


MODELS = {  # per --model: n, tokens, batch, repeats, memory repeats, shortest transcript as a fraction of --tokens
    "random": {"n": 64, "tokens": 512, "batch": 16, "repeats": 5, "memory_repeats": 3, "low": 0.7},
    "smollm2": {"n": 2, "tokens": 1024, "batch": 2, "repeats": 0, "memory_repeats": 3, "low": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="random",
                    help="random: a random 20.9M Llama-shaped model; smollm2: the real SmolLM2-135M-Instruct")
    ap.add_argument("--n", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int, help="in-process timing repeats (random model)")
    ap.add_argument("--memory-repeats", type=int, help="fresh processes per side (median)")
    ap.add_argument("--low", type=float, help="shortest transcript, as a fraction of --tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for key, value in MODELS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], args.n, args.tokens, args.batch, args.low)
        return
    torch.set_num_threads(args.threads)
    (run_smollm2 if args.model == "smollm2" else run_random)(args)


if __name__ == "__main__":
    main()
