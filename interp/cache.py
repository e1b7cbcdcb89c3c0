"""Cache residual-stream activations of transcripts at chosen layers and positions.

:func:`cache_activations` renders transcripts through the model's chat template, batches them
with padding and the attention mask, runs the model only as far as the highest requested layer,
and keeps only the selected positions inside the hook, so memory grows with what is kept, not
with sequence length. It returns :class:`~interp.store.Activations` in memory, or streams
shards to an :class:`~interp.store.ActivationStore` on disk and resumes an interrupted run.

Example (any model handle from :func:`interp.models.load_model`)::

    acts = cache_activations(model, transcripts, layers="all", positions="decision")
    X = acts.stack()                     # [n_transcripts, n_layers, d_model]
    y = acts.binary_labels("harmful", per="transcript")   # [n_transcripts] bool
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from interp.models import SITES, Model, Site, check_choice, hook_name, position_ids_from_mask
from interp.positions import Pick, Selector, parse
from interp.store import FLOAT_DTYPES, Activations, ActivationStore, concat, ranks
from interp.transcripts import RenderedTranscript, Transcript, TranscriptError, count_tokens, render


def resolve_layers(model: Model, layers: str | int | Sequence[int]) -> list[int]:
    """``"all"``, one index, or a list (negative from the end) → sorted unique layer indices."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an integer or a list of integers, got {layers!r}")
        return list(range(model.n_layers))
    if not hasattr(layers, "__iter__"):
        layers = [layers]  # one index, of any integer type (checked below)
    return sorted(set(model.check_layers(list(layers), "resid_post")))


def render_for(model: Model, transcripts: Sequence[Transcript | RenderedTranscript],
               truncate: bool = False) -> list[RenderedTranscript]:
    """Render transcripts with the model's tokenizer, checking them against its context."""
    if len(transcripts) == 0:
        raise ValueError("no transcripts given (the list is empty)")
    out = []
    for t in transcripts:
        r = t if isinstance(t, RenderedTranscript) else render(t, model.tokenizer, max_length=model.n_ctx,
                                                                  truncate=truncate)
        if model.n_ctx is not None and len(r) > model.n_ctx:
            raise ValueError(f"transcript {r.id!r} has {len(r)} tokens, longer than the context of "
                             f"{model.name} ({model.n_ctx}); render it with truncate=True")
        out.append(r)
    return out


def check_context(model: Model, transcripts: Sequence[Transcript], *, reserve: int = 0,
                  hint: str = "render with truncate=True to keep the last tokens") -> None:
    """Raise :class:`~interp.transcripts.TranscriptError` naming the first transcript (with its
    file and record) that renders to more than the model's context less ``reserve`` tokens
    (room to generate). Counts tokens without labelling them, so it is cheap enough to run
    before any work."""
    if model.n_ctx is None:
        return
    limit = model.n_ctx - reserve
    for t in transcripts:
        n = count_tokens(t, model.tokenizer)
        if n > limit:
            place = f"{t.source}, transcript {t.id!r}" if t.source else f"transcript {t.id!r}"
            room = f" less {reserve} tokens to generate" if reserve else ""
            raise TranscriptError(f"{place}: renders to {n} tokens{' with its prefix' if t.prefix else ''}, longer "
                                  f"than the context of {model.name} ({model.n_ctx}{room}); {hint}")


def storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype to store activations in, given as a ``torch.dtype`` or its name
    (``"float16"``, ``"torch.bfloat16"``); integer and boolean dtypes cannot hold them."""
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if not isinstance(dtype, (str, torch.dtype)) or name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot hold activations: use a floating dtype "
                         f"({', '.join(FLOAT_DTYPES)}, as a torch.dtype or its name)")
    return FLOAT_DTYPES[name]


PaddingSide = Literal["left", "right"]


def pad_batch(sequences: Sequence[RenderedTranscript | Sequence[int] | np.ndarray], pad_id: int,
              side: PaddingSide = "left") -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Pad token ids (rendered transcripts or id sequences) into ``input_ids, attention_mask
    [batch, pos]`` and return each row's offset (where its first token sits) so positions can be
    shifted: ``[batch]``. The one padding routine of the toolkit."""
    check_choice(side, get_args(PaddingSide), "padding side")
    rows = [np.asarray(getattr(r, "input_ids", r), dtype=np.int64) for r in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = np.zeros(len(rows), dtype=np.int64)
    for b, r in enumerate(rows):
        off = width - len(r) if side == "left" else 0
        ids[b, off:off + len(r)] = torch.from_numpy(r)
        mask[b, off:off + len(r)] = 1
        offsets[b] = off
    return ids, mask, offsets


def _gather_fn(picks: list[list[Pick]], offsets: np.ndarray):
    """A function reducing ``[batch, pos, d]`` to ``[rows, d]``: the picked positions, averaged
    where a pick spans several tokens (always in float32)."""
    b_idx, p_idx, row_idx, weight = [], [], [], []
    row = 0
    for b, ps in enumerate(picks):
        for pick in ps:
            for p in pick.positions:
                b_idx.append(b)
                p_idx.append(int(p) + int(offsets[b]))
                row_idx.append(row)
                weight.append(1.0 / len(pick.positions))
            row += 1
    n_rows = row
    b_t, p_t = torch.as_tensor(b_idx), torch.as_tensor(p_idx)
    if len(b_idx) == n_rows:  # one position per row: plain indexing
        return lambda x: x[b_t.to(x.device), p_t.to(x.device)].float()
    r_t, w_t = torch.as_tensor(row_idx), torch.as_tensor(weight)

    def gather(x: torch.Tensor) -> torch.Tensor:
        vals = x[b_t.to(x.device), p_t.to(x.device)].float() * w_t.to(x.device)[:, None]
        return torch.zeros(n_rows, x.shape[-1], device=x.device).index_add_(0, r_t.to(x.device), vals)

    return gather


def _transcript_info(i: int, r: RenderedTranscript) -> dict:
    return {"index": i, "id": r.id, "labels": dict(r.transcript.labels), "n_tokens": len(r), "truncated": r.truncated}


@dataclass(frozen=True)
class _Plan:
    """One call's checked inputs, split into shards: transcripts ``[k * shard_size, (k + 1) *
    shard_size)`` form shard ``k``, in memory as on disk."""

    model: Model
    rendered: list[RenderedTranscript]
    picks: list[list[Pick]]
    layers: list[int]
    site: Site
    selector: Selector
    dtype: torch.dtype
    batch_size: int
    shard_size: int
    padding_side: PaddingSide

    @property
    def n_shards(self) -> int:
        return (len(self.rendered) + self.shard_size - 1) // self.shard_size

    def span(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, len(self.rendered))

    def shape(self, k: int) -> tuple[int, int, int]:
        """Shard ``k``'s activations: ``[rows, n_layers, d_model]``."""
        a, b = self.span(k)
        return sum(len(p) for p in self.picks[a:b]), len(self.layers), self.model.d_model

    def infos(self) -> list[dict]:
        return [_transcript_info(i, r) for i, r in enumerate(self.rendered)]

    def meta(self) -> dict:
        return {
            "model": self.model.name, "backend": self.model.backend, "d_model": self.model.d_model,
            "n_layers": self.model.n_layers, "layers": list(self.layers), "site": self.site,
            "hook_names": [hook_name(i, self.site) for i in self.layers], "selector": self.selector.name,
            "dtype": str(self.dtype).removeprefix("torch."), "n_transcripts": len(self.rendered),
            "shard_size": self.shard_size,
        }

    def compute(self, k: int, bar) -> torch.Tensor:
        """Shard ``k``'s activations ``[rows, n_layers, d_model]`` in row order (transcripts in
        order, each its picks), batched by length."""
        a, b = self.span(k)
        rendered, picks = self.rendered[a:b], self.picks[a:b]
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # less padding per batch
        per_transcript: list[torch.Tensor | None] = [None] * len(rendered)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            ids, mask, offsets = pad_batch([rendered[i] for i in idx], self.model.tokenizer.pad_token_id,
                                           self.padding_side)
            got = self.model.residual(ids, mask, self.layers, self.site,
                                      gather=_gather_fn([picks[i] for i in idx], offsets))
            block = torch.stack([got[layer] for layer in self.layers], dim=1).to(self.dtype).cpu()
            row = 0
            for i in idx:
                per_transcript[i] = block[row:row + len(picks[i])]
                row += len(picks[i])
            bar.update(len(idx))
        return torch.cat(per_transcript)

    def assemble(self, k: int, acts: torch.Tensor, infos: tuple) -> Activations:
        """Shard ``k`` as :class:`Activations`: ``acts`` with its rows' table (no model needed)."""
        a, b = self.span(k)
        rows: dict[str, list[int]] = {"transcript": [], "position": [], "n_positions": [], "kind": [],
                                      "message": [], "turn": []}
        selectors = []
        for i in range(a, b):
            r = self.rendered[i]
            for pick in self.picks[i]:
                p = pick.position
                for key, value in (("transcript", i), ("position", p), ("n_positions", len(pick.positions)),
                                   ("kind", r.kind[p]), ("message", r.message[p]), ("turn", r.turn[p])):
                    rows[key].append(int(value))
                selectors.append(pick.selector)
        return Activations(acts=acts, layers=tuple(self.layers), site=self.site,
                           rows={name: np.asarray(v, dtype=np.int64) for name, v in rows.items()},
                           selectors=tuple(selectors), transcripts=infos)


def _plan(model: Model, transcripts: Sequence[Transcript | RenderedTranscript], layers, site: Site, positions,
          batch_size: int, shard_size: int, dtype, padding_side: PaddingSide, truncate: bool) -> _Plan:
    """Check every argument and select every transcript's rows, before any work."""
    check_choice(site, SITES, "site")
    check_choice(padding_side, get_args(PaddingSide), "padding side")
    dtype = storage_dtype(dtype)
    layers = resolve_layers(model, layers)
    model.check_layers(layers, site)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive (got {batch_size}, {shard_size})")
    selector = parse(positions)
    rendered = render_for(model, transcripts, truncate=truncate)
    picks = [selector(r) for r in rendered]  # raises if a selector matches nothing, before any write
    return _Plan(model, rendered, picks, layers, site, selector, dtype, batch_size, shard_size, padding_side)


def cache_activations(
    model: Model,
    transcripts: Sequence[Transcript | RenderedTranscript],
    *,
    layers: str | int | Sequence[int] = "all",
    site: Site = "resid_post",
    positions: Selector | str = "decision",
    batch_size: int = 8,
    store: str | Path | None = None,
    shard_size: int = 256,
    dtype: torch.dtype = torch.float32,
    padding_side: PaddingSide = "left",
    truncate: bool = False,
    progress: bool = True,
) -> Activations | ActivationStore:
    """Cache the residual stream of ``transcripts`` at ``layers`` × ``positions``.

    Args:
        model: a handle from :func:`interp.models.load_model` (any backend).
        transcripts: transcripts (rendered here with the model's chat template) or already
            rendered ones.
        layers: ``"all"``, a layer index, or a list of them.
        site: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``.
        positions: a selector from :mod:`interp.positions` or its name (``"decision"``,
            ``"every:prefix"``, ``"last:user+decision"``, ...).
        batch_size: transcripts per forward pass (similar lengths are batched together).
        store: a new or empty directory to stream shards to, or a store of the same run to
            resume (missing or corrupt shards are computed again); a folder that is neither
            is refused untouched (:class:`~interp.store.StoreError`), as is a store another
            process is writing. ``None`` keeps everything in memory.
        shard_size: transcripts per shard on disk.
        dtype: storage dtype, a floating ``torch.dtype`` or its name (float32 default;
            bfloat16/float16 halve the size); anything else raises ``ValueError``.
        padding_side: ``"left"`` or ``"right"``; results do not depend on it.
        truncate: keep the last ``n_ctx`` tokens of transcripts longer than the context
            (otherwise they raise).

    Under ``torchrun`` / ``accelerate launch`` (a ``torch.distributed`` job, see
    :mod:`interp.store.ranks` and docs/distributed.md) every rank calls this with the same
    arguments; rank ``R`` of ``N`` computes shards ``k`` with ``k % N == R``. With ``store``, the
    ranks write one store, byte for byte what one process writes; in memory, every rank returns
    all the activations (each shard computed once, then broadcast). A failure on any rank raises
    on every rank (:class:`~interp.store.ranks.RankError` on the others).

    Returns:
        :class:`Activations` with ``acts [rows, n_layers, d_model]``, or the
        :class:`ActivationStore` when ``store`` is given.
    """
    with ranks.joined() as job:
        plan = ranks.agree(job, "checking its inputs", lambda: _plan(
            model, transcripts, layers, site, positions, batch_size, shard_size, dtype, padding_side, truncate))
        ranks.check_same(job, "runs (model, layers, site, selector, dtype, shards, batches, transcripts)",
                         [plan.meta(), plan.infos(), plan.batch_size, plan.padding_side])
        mine = [k for k in range(plan.n_shards) if job is None or job.owns(k)]
        where = "" if job is None else f" (rank {job.rank} of {job.world})"
        bar = tqdm(total=sum(b - a for a, b in map(plan.span, mine)), desc=f"caching {model.name}{where}",
                   unit="transcript", disable=not progress or (job is not None and job.rank != 0))
        try:
            if store is None:
                return _in_memory(plan, job, mine, bar)
            if job is not None:
                return ranks.write_store(job, store, plan.meta(), plan.infos(),
                                         lambda st: _write_shards(plan, st, mine, bar))
            with ActivationStore.writing(store, plan.meta(), plan.infos()) as st:
                _write_shards(plan, st, mine, bar)
            return ActivationStore.open(st.path, verify=False)
        finally:
            bar.close()


def _write_shards(plan: _Plan, st: ActivationStore, shards: list[int], bar) -> None:
    """Compute and write the shards of ``shards`` the store does not hold yet."""
    done, infos = st.done(), tuple(plan.infos())
    for k in shards:
        if k in done:
            bar.update(plan.span(k)[1] - plan.span(k)[0])
            continue
        st.write_shard(k, plan.assemble(k, plan.compute(k, bar), infos), plan.span(k))


def _in_memory(plan: _Plan, job: ranks.Ranks | None, mine: list[int], bar) -> Activations:
    """All shards in memory: computed here, or (in a job) each by its rank and broadcast."""
    computed = ranks.agree(job, "while caching", lambda: {k: plan.compute(k, bar) for k in mine})
    if job is not None:
        computed = {k: ranks.share(job, k % job.world, computed.get(k), plan.shape(k), plan.dtype)
                    for k in range(plan.n_shards)}
    infos = tuple(plan.infos())
    parts = [plan.assemble(k, computed[k], infos) for k in range(plan.n_shards)]
    return replace(concat(parts), meta=plan.meta())


# --------------------------------------------------------------------------------------------
# Many prefixes on shared contexts


@torch.no_grad()
def cache_prefixed(
    model: Model,
    transcripts: Sequence[Transcript],
    prefixes: Sequence[str | None],
    *,
    layers: str | int | Sequence[int] = "all",
    site: Site = "resid_post",
    batch_size: int = 32,
    max_rows: int = 512,
) -> torch.Tensor:
    """The residual stream at the decision position (:func:`interp.positions.decision`: the last
    token of a generation prompt, or of its forced prefix) of every transcript with every prefix
    forced (None: no prefix): ``[n_prefixes, n_transcripts, n_layers, d_model]`` float32.

    Each transcript's context (rendered for generation, without a prefix) runs once per batch of
    ``batch_size`` transcripts; each prefix then runs only its own tokens on the context's
    key-value cache, ``max_rows`` rows at a time. Tokens come from :func:`interp.transcripts.render`
    of the transcript carrying the prefix; where the context's tokens are not a leading part of
    them (a prefix that merges with the last context token), the whole sequence runs instead.
    """
    layers = resolve_layers(model, layers)
    model.check_layers(layers, site)
    contexts = render_for(model, [t.with_prefix(None) for t in transcripts])
    full = [[r.input_ids.tolist() for r in render_for(model, [t.with_prefix(p or None) for t in transcripts])]
            if p else [c.input_ids.tolist() for c in contexts] for p in prefixes]  # [P][T] ids
    out = torch.empty(len(prefixes), len(transcripts), len(layers), model.d_model)
    pad = model.tokenizer.pad_token_id or 0
    slow: list[tuple[int, int]] = []
    order = sorted(range(len(transcripts)), key=lambda t: len(contexts[t]))
    for s in range(0, len(order), batch_size):
        tasks = order[s:s + batch_size]
        ctx = [contexts[t] for t in tasks]
        ids, mask, _ = pad_batch(ctx, pad, "left")  # the context's last token is the last column
        kv, last = _context_pass(model, ids, mask, layers, site)
        tails: list[tuple[int, list[list[int] | None]]] = []  # (prefix index, per task its tokens after the context)
        for p in range(len(prefixes)):
            rows: list[list[int] | None] = []
            for j, t in enumerate(tasks):
                body, whole = contexts[t].input_ids.tolist(), full[p][t]
                if whole[:len(body)] != body:
                    slow.append((p, t))
                    rows.append(None)
                elif len(whole) == len(body):
                    out[p, t] = last[j]
                    rows.append(None)
                else:
                    rows.append(whole[len(body):])
            if any(rows):
                tails.append((p, rows))
        tails.sort(key=lambda x: max(len(r) for r in x[1] if r))  # less padding
        per_chunk = max(1, max_rows // len(tasks))
        for c in range(0, len(tails), per_chunk):
            _tail_pass(model, kv, mask, tails[c:c + per_chunk], tasks, layers, site, pad, out)
    for s in range(0, len(slow), batch_size):  # contexts that do not end on a token boundary
        part = slow[s:s + batch_size]
        ids, mask, _ = pad_batch([full[p][t] for p, t in part], pad, "left")
        got = model.residual(ids, mask, layers, site, gather=lambda x: x[:, -1].float().cpu())
        acts = torch.stack([got[i] for i in layers], 1)
        for j, (p, t) in enumerate(part):
            out[p, t] = acts[j]
    return out


def _context_pass(model: Model, ids: torch.Tensor, mask: torch.Tensor, layers: list[int], site: Site):
    """Run left-padded contexts once: their key-value cache and the last column's activations
    ``[batch, n_layers, d_model]``."""
    kv = DynamicCache()
    got: dict[int, torch.Tensor] = {}
    keep = {i: (lambda x, i=i: got.__setitem__(i, x[:, -1].float().cpu())) for i in layers}
    with model.hooks(keep, site, stop_after=layers[-1]):
        run_on_cache(model.hf_model, ids, mask, kv)
    return kv, torch.stack([got[i] for i in layers], 1)


def _tail_pass(model: Model, kv, mask: torch.Tensor, chunk, tasks: list[int], layers: list[int], site: Site,
               pad: int, out: torch.Tensor) -> None:
    """Run the prefix tokens of ``chunk`` (several prefixes for the same batch of contexts) on a
    copy of the contexts' key-value cache; write the last prefix token's activations into ``out``."""
    B, K = len(tasks), len(chunk)
    flat = [chunk[k][1][j] or [] for j in range(B) for k in range(K)]  # task-major, as repeat_interleave
    pids, attn, pos, ends = tail_inputs(mask.repeat_interleave(K, 0), flat, pad, model.device)
    cache = copy.deepcopy(kv)
    cache.batch_repeat_interleave(K)
    got: dict[int, torch.Tensor] = {}
    rows_ = torch.arange(B * K, device=model.device)
    keep = {i: (lambda x, i=i: got.__setitem__(i, x[rows_, ends].float().cpu())) for i in layers}
    with model.hooks(keep, site, stop_after=layers[-1]):
        run_on_cache(model.hf_model, pids, attn, cache, position_ids=pos)
    acts = torch.stack([got[i] for i in layers], 1).view(B, K, len(layers), -1)
    for k, (p, rows) in enumerate(chunk):
        for j, (t, r) in enumerate(zip(tasks, rows)):
            if r:
                out[p, t] = acts[j, k]


# --------------------------------------------------------------------------------------------
# Key-value reuse: what cache_prefixed and interp.ping.scoring.ContextCache share


def run_on_cache(hf_model: Any, ids: torch.Tensor, mask: torch.Tensor, kv: DynamicCache, *,
                 position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """One forward of ``ids`` ``[batch, pos]`` that reads and extends the key-value cache ``kv``;
    ``mask`` covers the cache and ``ids`` (``[batch, cached + pos]``); positions count its real
    tokens unless given. Returns the model's output."""
    dev = next(hf_model.parameters()).device
    mask = mask.to(dev)
    if position_ids is None:
        position_ids = position_ids_from_mask(mask)[:, -ids.shape[1]:]
    return hf_model(input_ids=ids.to(dev), attention_mask=mask, position_ids=position_ids.to(dev),
                    past_key_values=kv, use_cache=True, **kwargs)


def tail_inputs(mask: torch.Tensor, tails: Sequence[Sequence[int]], pad: int, device: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs that continue cached left-padded contexts (``mask`` ``[rows, width]``) with one tail
    of tokens per row, right-padded: ``input_ids`` ``[rows, m]``, the attention mask over context
    and tail ``[rows, width + m]``, positions ``[rows, m]`` and each tail's last column ``[rows]``
    (0 for an empty tail, whose row's output is then meaningless)."""
    m = max(1, max(len(r) for r in tails))
    ids = torch.full((len(tails), m), pad, dtype=torch.long)
    tmask = torch.zeros((len(tails), m), dtype=torch.long)
    for j, r in enumerate(tails):
        if len(r):
            ids[j, :len(r)] = torch.tensor(list(r))
            tmask[j, :len(r)] = 1
    mask, tmask = mask.to(device), tmask.to(device)
    pos = mask.sum(1)[:, None] + torch.arange(m, device=device)[None]
    return ids.to(device), torch.cat([mask, tmask], 1), pos, (tmask.sum(1) - 1).clamp(min=0)


def copy_cache(kv: DynamicCache, rows: torch.Tensor | None = None, device: Any = None) -> DynamicCache:
    """A new key-value cache with ``rows`` of ``kv`` (all by default) on ``device`` (where they
    are by default). It shares no tensor with ``kv``: running the model on it leaves ``kv`` as it was."""
    layers = [(layer.keys, layer.values) for layer in kv.layers]
    if rows is not None:
        layers = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in layers]
    return DynamicCache(ddp_cache_data=[(k.to(device or k.device), v.to(device or v.device)) for k, v in layers])
