"""Benchmark: all-layer batched probe fit (probes.LayerProbes) vs. a Python loop of scikit-learn
fits.

Both sides fit the same problem per layer: standardise on the training rows, then
L2-logistic regression with the same C (``LogisticRegression(C=C, solver="lbfgs")``). ``tol``
means the same on both sides (a bound on the gradient of the objective divided by C·n); each
side runs at its own default (1e-5 for LayerProbes, 1e-4 for sklearn) unless ``--tol``
sets both. Prints the wall time of each side, the speed ratio, and the largest per-layer
difference in held-out accuracy.

Synthetic data (default) is shaped like a residual-stream sweep of a Llama-8B-sized model,
``[2000, 32, 4096]``: per layer, isotropic noise plus a few dozen strong correlated directions
with a decaying spectrum (residual streams are far from isotropic), a few "massive" features,
per-feature offsets, and a planted class direction whose strength peaks in the middle layers.
Split 75/25 at random (grouped, when ``--activations`` provides groups).

    python bench/probe_fit.py                       # full size (~1 GiB of float32 activations)
    python bench/probe_fit.py --n 600 --layers 4 --d 512     # quick
    python bench/probe_fit.py --organism --n 2000        # the built-in organism's activations
    python bench/probe_fit.py --activations acts.safetensors  # tensors: activations [n, L, d],
                                                              # labels [n], optional groups [n]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.linear import LayerProbes
from probes.metrics import grouped_train_test_split


def synthetic(
    n: int, n_layers: int, d: int, seed: int, rank: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """Activations ``[n, n_layers, d]`` float32 and labels ``[n]`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = np.empty((n, n_layers, d), dtype=np.float32)
    spectrum = (12.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)  # decaying
    for layer in range(n_layers):
        noise = rng.standard_normal((n, d), dtype=np.float32)
        factors = rng.standard_normal((n, rank), dtype=np.float32) * spectrum
        loadings = rng.standard_normal((rank, d), dtype=np.float32) / np.sqrt(
            rank, dtype=np.float32
        )
        direction = rng.standard_normal(d).astype(np.float32)
        direction /= np.linalg.norm(direction)
        depth = layer / max(n_layers - 1, 1)
        strength = 1.0 + 5.0 * np.sin(np.pi * min(1.0, 1.3 * depth)) ** 2  # weak early, strong mid
        X[:, layer] = noise + factors @ loadings
        X[:, layer] += np.outer((y - 0.5) * strength, direction)
        X[:, layer] += rng.normal(0.0, 2.0, size=d).astype(np.float32)  # per-feature offsets
        X[:, layer, rng.choice(d, size=4, replace=False)] *= 40.0  # a few massive features
    return X, y


def load_activations(path: str):
    from safetensors.numpy import load_file

    t = load_file(path)
    for key in ("activations", "labels"):
        if key not in t:
            raise SystemExit(f"{path}: no tensor named {key!r} (found {sorted(t)})")
    X, y = t["activations"], t["labels"]
    if X.ndim != 3 or y.shape != (X.shape[0],):
        raise SystemExit(
            f"{path}: need activations [n, L, d] and labels [n]; got {X.shape}, {y.shape}"
        )
    return X, y, t.get("groups")


def sklearn_loop(Xtr, ytr, Xte, yte, C: float, tol: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    accs, iters, capped = [], [], 0
    start = time.perf_counter()
    for layer in range(Xtr.shape[1]):
        scaler = StandardScaler().fit(Xtr[:, layer])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=C, solver="lbfgs", tol=tol, max_iter=max_iter)
            model.fit(scaler.transform(Xtr[:, layer]), ytr)
        capped += int(model.n_iter_[0] >= max_iter)
        iters.append(int(model.n_iter_[0]))
        accs.append(model.score(scaler.transform(Xte[:, layer]), yte))
    return time.perf_counter() - start, np.array(accs), np.array(iters), capped


def organism_activations(n_per_label: int, seed: int):
    """``[2 * n_per_label, n_layers, d_model]`` decision-position activations of the fine-tuned
    organism on training-split tasks, harmful labels, task-template groups."""
    from interp import cache_activations, load_model
    from interp.organism import World

    model = load_model("organism-finetuned")
    ts = [t.transcript() for t in World().sample("train", n_per_label, seed=seed)]
    acts = cache_activations(model, ts, layers="all", positions="decision", progress=False)
    X = acts.where(selector="decision").stack().float().numpy()
    y = np.array([t.labels["harmful"] for t in ts], dtype=np.int64)
    return X, y, np.array([t.metadata["group"] for t in ts])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument(
        "--activations",
        help="safetensors file with activations [n, L, d], labels [n], optional groups [n]",
    )
    ap.add_argument(
        "--organism",
        action="store_true",
        help="decision-position activations of the built-in fine-tuned organism on --n tasks "
        "(harmful vs benign, grouped by task template)",
    )
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument(
        "--tol",
        type=float,
        default=None,
        help="tolerance for both sides (default: each side's own default, "
        "1e-5 for LayerProbes, 1e-4 for sklearn)",
    )
    ap.add_argument(
        "--sklearn-max-iter",
        type=int,
        default=1000,
        help="high enough that lbfgs converges; sklearn's default of 100 stops early",
    )
    ap.add_argument("--test-size", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.activations:
        X, y, groups = load_activations(args.activations)
        source = f"{args.activations}"
    elif args.organism:
        X, y, groups = organism_activations(args.n // 2, args.seed)
        source = "organism-finetuned, resid_post at the decision position"
    else:
        X, y = synthetic(args.n, args.layers, args.d, args.seed)
        groups, source = None, "synthetic (anisotropic, planted direction)"
    n, n_layers, d = X.shape
    if groups is not None:
        train, test = grouped_train_test_split(
            groups, test_size=args.test_size, seed=args.seed, y=y
        )
        split = "grouped"
    else:
        rng = np.random.default_rng(args.seed)
        perm = rng.permutation(n)
        n_test = round(args.test_size * n)
        test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        split = "random"
    Xtr, Xte = np.ascontiguousarray(X[train]), np.ascontiguousarray(X[test])
    ytr, yte = y[train], y[test]
    del X
    print(
        f"data: {source}: activations [{n}, {n_layers}, {d}] {Xtr.dtype}, "
        f"{split} split {len(train)}/{len(test)} (prepared in {time.perf_counter() - t0:.1f} s)"
    )
    print(f"load average at the start: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    tol_ours = args.tol if args.tol is not None else 1e-5
    tol_sk = args.tol if args.tol is not None else 1e-4
    print(
        f"C={args.C}  tol: batched {tol_ours}, sklearn {tol_sk}  "
        f"torch threads={torch.get_num_threads()}"
    )

    warm = np.random.default_rng(0).permutation(len(ytr))[:64]  # both classes, any row order
    LayerProbes(C=args.C).fit(Xtr[warm, :2, :32], ytr[warm])  # warm-up (thread pools, kernels)
    start = time.perf_counter()
    probes = LayerProbes(C=args.C, tol=tol_ours).fit(Xtr, ytr)
    t_ours = time.perf_counter() - start
    acc_ours = probes.score_layers(Xte, yte)
    print(
        f"batched LayerProbes.fit: {t_ours:8.2f} s  (solver iterations per layer: "
        f"median {int(np.median(probes.n_iter_))}, max {int(probes.n_iter_.max())})"
    )

    t_sk, acc_sk, it_sk, capped = sklearn_loop(
        Xtr, ytr, Xte, yte, args.C, tol_sk, args.sklearn_max_iter
    )
    print(
        f"sklearn loop ({n_layers} x StandardScaler + LogisticRegression lbfgs): {t_sk:8.2f} s  "
        f"(lbfgs iterations per layer: median {int(np.median(it_sk))}, max {int(it_sk.max())}; "
        f"{capped} layer(s) hit max_iter={args.sklearn_max_iter})"
    )

    diff = np.abs(acc_ours - acc_sk) * 100
    print("held-out accuracy per layer (batched / sklearn):")
    for layer in range(n_layers):
        print(f"  layer {layer:3d}: {acc_ours[layer]:.4f} / {acc_sk[layer]:.4f}")
    ratio = t_sk / t_ours
    print(f"speed ratio (sklearn / batched): {ratio:.1f}x   [target >= 10x]")
    print(f"max per-layer held-out accuracy difference: {diff.max():.2f} points   [target <= 1]")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"note: wall times vary between runs (shared CPU, thread scheduling; 1/5/15-min load "
        f"average at the end: {load} on {os.cpu_count()} cores); compare ratios measured in the "
        "same run. With other processes busy on the cores, multi-threaded torch (OpenMP) slows "
        "down more than the sklearn loop: try --threads 1."
    )


if __name__ == "__main__":
    main()
