"""Benchmark: what caching costs on top of a bare forward, and how much memory it saves.

On a random ~20M-parameter Llama-shaped model, 64 agent transcripts of ~512 tokens, batch 16:
  (a) wall time of ``cache_activations`` keeping 2 positions at every layer, divided by a bare
      forward (``hf_model(...)`` to logits) of the same batches            target <= 1.05
  (b) peak memory of that, versus the bridge's full ``run_with_cache``     target >= 20x less
      (median over fresh processes; the forward's own working set bounds this ratio)

Ratios are measured in one run and vary between runs on a shared machine. Memory is measured in
fresh subprocesses (peak RSS above the RSS after loading). Run: ``.venv/bin/python bench/cache_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def bench_transcripts(n: int, target_tokens: int, tok):
    """``n`` rendered agent transcripts of 70-100% of ``target_tokens`` tokens (a long page observation)."""
    from interp.transcripts import Transcript, render

    def make(i: int, n_words: int):
        page = " ".join(rng.choice(WORDS) for _ in range(n_words))
        t = Transcript.from_messages([
            {"role": "system", "content": "You are a helpful web agent."},
            {"role": "user", "content": "Post the weekly team update on the forum."},
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "open", "arguments": {"url": "forum"}}}]},
            {"role": "tool", "tool_call_id": "c", "content": page},
        ], id=f"b{i}", prefix="I will check the task first.")
        return render(t, tok)

    rng = random.Random(0)
    base, probe = len(make(-1, 0)), len(make(-1, 100))
    per_word = (probe - base) / 100
    rng = random.Random(0)
    return [make(i, int((rng.uniform(0.7, 1.0) * target_tokens - base) / per_word)) for i in range(n)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(mode: str, model_dir: str, n: int, tokens: int, batch: int) -> None:
    """Run in a subprocess: print peak RSS growth (bytes) of one way of getting activations."""
    torch.set_num_threads(2)
    from interp.cache import cache_activations, pad_batch
    from interp.models import load_model

    backend, attn = {"cache-hf-sdpa": ("hf", "sdpa"), "cache-bridge": ("bridge", "eager"),
                     "run_with_cache": ("bridge", "eager"), "bare-hf-sdpa": ("hf", "sdpa")}[mode]
    model = load_model(model_dir, backend=backend, attn_implementation=attn)
    rendered = bench_transcripts(n, tokens, model.tokenizer)
    base = rss_bytes()
    with torch.no_grad():
        if mode.startswith("cache"):
            cache_activations(model, rendered, layers="all", positions="decision+last:user", batch_size=batch,
                              progress=False)
        elif mode.startswith("bare"):  # the forward alone, to logits: the floor under any caching
            for lo in range(0, n, batch):
                ids, mask, _ = pad_batch(rendered[lo:lo + batch], model.tokenizer.pad_token_id)
                model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:  # what one would do without the toolkit: cache everything per batch, then select
            for lo in range(0, n, batch):
                ids, mask, _ = pad_batch(rendered[lo:lo + batch], model.tokenizer.pad_token_id)
                _, cache = model.native.run_with_cache(ids, attention_mask=mask)
                del cache
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": peak - base}))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per memory measurement (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", nargs=2, metavar=("MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], args.n, args.tokens, args.batch)
        return
    torch.set_num_threads(args.threads)
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
            rendered = bench_transcripts(args.n, args.tokens, model.tokenizer)
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
                cache_activations(model, rendered, layers="all", positions="decision+last:user",
                                  batch_size=args.batch, progress=False)

            t_bare, t_cache = time_pair(bare, cached, args.repeats)
            results[backend] = t_cache / t_bare
            mean_len = sum(len(r) for r in rendered) / len(rendered)
            print(f"  {backend:8s} bare forward {t_bare:6.2f}s   cache_activations {t_cache:6.2f}s   "
                  f"ratio {t_cache / t_bare:.3f}  (mean {mean_len:.0f} tokens)")

        mem = {}
        for mode in ("bare-hf-sdpa", "cache-hf-sdpa", "cache-bridge", "run_with_cache"):
            runs = []
            for _ in range(args.memory_repeats):  # peak RSS varies between processes (allocator, lazy init)
                out = subprocess.run([sys.executable, __file__, "--memory-child", mode, tmp, "--n", str(args.n),
                                      "--tokens", str(args.tokens), "--batch", str(args.batch)],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"])
            mem[mode] = statistics.median(runs)
            print(f"  {mode}: peak RSS growth per process {', '.join(f'{r / 2**20:.0f}' for r in runs)} MiB")
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


if __name__ == "__main__":
    main()
