"""The activation store on disk: :class:`ActivationStore` (reading, validating, and the one
writer that creates or resumes a store)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from interp.atomic import TMP_SUFFIX, atomic_path, save_json, write_lines
from interp.positions import parse
from interp.store.activations import ROW_COLUMNS, Activations
from interp.store.lock import LOCK_NAME, RANK_LOCK, WriterLock, rank_lock_name
from interp.store.schema import (
    FORMAT,
    READ_ONLY_FORMATS,
    StoreError,
    check_manifest,
    check_meta,
    check_shard_header,
    check_transcripts,
    header_metadata,
    n_shards,
    read_header,
    shard_name,
)

_TEMPORARY = re.compile(r"\.(?:meta\.json|manifest\.json|manifest\.rank\d+\.json|transcripts\.jsonl|\d{5}\.safetensors)"
                        r"\.\d+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX))
"""Temporary names :mod:`interp.atomic` gives the store's own files: the only leftovers a writer
deletes (those of a killed writer; it holds the lock, so no live writer owns them)."""
_PART = re.compile(r"manifest\.rank(\d+)\.json")
"""A manifest part: the shards one rank of a distributed job wrote (:func:`part_name`)."""


def part_name(rank: int) -> str:
    """The manifest part rank ``rank`` of a distributed job records its shards in, until rank 0
    merges it into ``manifest.json``."""
    return f"manifest.rank{rank}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, name: str) -> Any:
    try:
        text = (path / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"store {path}: {name} is missing") from None
    except UnicodeDecodeError as e:
        raise StoreError(f"store {path}: {name} is corrupt (not UTF-8: {e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreError(f"store {path}: {name} is corrupt ({e.msg} at line {e.lineno})") from None


def _read_transcripts(path: Path, meta: dict) -> list[dict]:
    name = "transcripts.jsonl"
    try:
        lines = [x for x in (path / name).read_text(encoding="utf-8").splitlines() if x.strip()]
        records = [json.loads(x) for x in lines]
    except FileNotFoundError:
        raise StoreError(f"store {path}: {name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"store {path}: {name} is corrupt ({e})") from None
    check_transcripts(records, meta, f"store {path}: {name}")
    return records


def _read_parts(path: Path, meta: dict) -> list[tuple[Path, list[dict]]]:
    """The manifest parts in ``path`` with their entries; a part that does not pass the schema
    is reported and contributes nothing (its shards are computed again)."""
    out = []
    for f in sorted(path.glob("manifest.rank*.json")):
        if not _PART.fullmatch(f.name) or f.is_symlink() or not f.is_file():
            continue
        try:
            part = _read_json(path, f.name)
            check_manifest(part, meta, f"store {path}: {f.name}")
        except StoreError as e:
            warnings.warn(f"{e}; computing its shards again", stacklevel=3)
            part = {"shards": []}
        out.append((f, part["shards"]))
    return out


def _fold(entries: list[dict], parts: list[tuple[Path, list[dict]]]) -> list[dict]:
    """Manifest entries with the parts' entries added (a part's entry replaces one for the same
    shard), sorted by shard index."""
    by_index = {e["index"]: e for e in entries}
    for _, more in parts:
        by_index.update((e["index"], e) for e in more)
    return [by_index[k] for k in sorted(by_index)]


def _make_dirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; return the folders this call made, innermost
    first (a folder another process makes at the same moment is not counted)."""
    missing = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
            made.append(d)
        except FileExistsError:
            pass
    return made[::-1]


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders :func:`_make_dirs` made, innermost first, while they are empty."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


class ActivationStore:
    """A directory of activation shards. Open one with :meth:`open`; make one with
    ``cache_activations(..., store=path)``."""

    def __init__(self, path: Path, meta: dict, manifest: dict, transcripts: list[dict]):
        self.path = path
        self.meta = meta
        self.manifest = manifest
        self.transcripts = transcripts
        self._lock: WriterLock | None = None
        self._part: Path | None = None  # where a rank of a distributed job records its shards
        self._written: list[dict] = []  # the entries this rank wrote

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.manifest['shards'])}/{self.n_shards} shards"
        return f"ActivationStore({str(self.path)!r}, {self.meta['model']!r}, layers={self.meta['layers']}, {state})"

    # -- reading

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> ActivationStore:
        """Open and validate a store (see :mod:`interp.store.schema`). ``verify`` checks every
        shard's sha256 (else its size and header only)."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"no activation store at {path}")
        meta = cls._read_meta(path)
        manifest = _read_json(path, "manifest.json")
        check_manifest(manifest, meta, f"store {path}: manifest.json")
        store = cls(path, meta, manifest, _read_transcripts(path, meta))
        for entry in manifest["shards"]:
            problem = store._shard_problem(entry, verify)
            if problem:
                raise StoreError(f"store {path}: {problem}; run cache_activations(..., store={str(path)!r}) again "
                                 "with the same arguments to compute it again")
        return store

    @staticmethod
    def _read_meta(path: Path) -> dict:
        meta = _read_json(path, "meta.json")
        check_meta(meta, f"store {path}: meta.json")
        return meta

    def _shard_problem(self, entry: dict, verify: bool) -> str | None:
        """What is wrong with a listed shard (missing, corrupt, a header that disagrees), or None."""
        name, f = entry["file"], self.path / entry["file"]
        if f.is_symlink() or (f.exists() and not f.is_file()):
            return f"shard {name} is not a plain file"
        if not f.exists():
            return f"shard {name} is missing"
        size = f.stat().st_size
        if size != entry["bytes"]:
            return f"shard {name} is corrupt ({size} bytes, manifest says {entry['bytes']})"
        if verify:
            digest = _sha256(f)
            if digest != entry["sha256"]:
                return f"shard {name} is corrupt (sha256 {digest[:12]}…, manifest says {entry['sha256'][:12]}…)"
        try:
            with safe_open(f, framework="pt") as h:
                check_shard_header(h, entry, self.meta, f"shard {name}")
        except StoreError as e:
            return str(e)
        except SafetensorError as e:
            return f"shard {name} is corrupt (unreadable header: {e})"
        return None

    def _sound(self, entries: list[dict], verify: bool, then: str) -> list[dict]:
        """The manifest entries whose shard is sound; a warning names each other one and ``then``
        (what happens to it)."""
        kept = []
        for entry in entries:
            problem = self._shard_problem(entry, verify)
            if problem:
                warnings.warn(f"store {self.path}: {problem}; {then}", stacklevel=3)
            else:
                kept.append(entry)
        return kept

    @property
    def n_shards(self) -> int:
        return n_shards(self.meta)

    @property
    def complete(self) -> bool:
        return len(self.manifest["shards"]) == self.n_shards

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.meta["layers"])

    def load(self, layers: Sequence[int] | None = None, allow_partial: bool = False) -> Activations:
        """Read activations (optionally only some layers) into memory."""
        if not self.complete and not allow_partial:
            raise StoreError(f"store {self.path} is incomplete ({len(self.manifest['shards'])} of "
                             f"{self.n_shards} shards); resume it with cache_activations(..., store=...)")
        all_layers = self.layers
        layers = tuple(all_layers if layers is None else layers)
        missing = [layer for layer in layers if layer not in all_layers]
        if missing:
            raise KeyError(f"layers {missing} are not in store {self.path} (stored: {list(all_layers)})")
        cols = [all_layers.index(layer) for layer in layers]
        acts, rows, selectors = [], {k: [] for k in ROW_COLUMNS}, []
        for entry in sorted(self.manifest["shards"], key=lambda e: e["index"]):
            with safe_open(self.path / entry["file"], framework="pt") as f:
                a = f.get_tensor("activations")
                acts.append(a[:, cols] if cols != list(range(len(all_layers))) else a)
                for k in ROW_COLUMNS:
                    rows[k].append(f.get_tensor(k).numpy())
                selectors.extend(parse(name) for name in read_header(f.metadata(), self.meta["format"])["selectors"])
        d = self.meta["d_model"]
        return Activations(
            acts=torch.cat(acts) if acts else torch.empty(0, len(layers), d),
            layers=layers, site=self.meta["site"],
            rows={k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in rows.items()},
            selectors=tuple(selectors), transcripts=tuple(self.transcripts), meta=dict(self.meta),
        )

    def rows(self):
        """The row table (transcript id, labels, selector, position, segment) as a ``datasets.Dataset``."""
        return self.load(layers=self.layers[:1], allow_partial=True).to_dataset()

    # -- writing (used by cache_activations)

    @classmethod
    @contextmanager
    def writing(cls, path: str | Path, meta: dict, transcripts: list[dict]) -> Iterator[ActivationStore]:
        """Hold the store at ``path`` for writing the run ``meta`` on ``transcripts``: a new or
        empty folder becomes a store; a store of the same run is resumed, its listed shards
        verified and any missing or corrupt one dropped to be computed again. A folder that is
        not empty and not a store, a store of another run, and a store another process is
        writing are refused before anything in them is touched. The writer lock
        (:mod:`interp.store.lock`) is held until the block ends."""
        path = Path(path)
        meta = {"format": FORMAT, **meta}
        check_meta(meta, "the run to cache")
        cls._check_claim(path, meta)  # touches nothing
        made = _make_dirs(path)
        lock = WriterLock(path)
        try:
            lock.acquire()
            store = cls._resume(path, meta, transcripts) if (path / "meta.json").exists() else \
                cls._create(path, meta, transcripts)
        except BaseException:
            lock.release()
            _remove_empty(made)  # only what this call made, and only if nothing is in it
            raise
        store._lock = lock
        try:
            yield store
        finally:
            store._lock = None
            lock.release()

    @classmethod
    def _check_claim(cls, path: Path, meta: dict) -> None:
        """Refuse ``path`` unless it is missing, empty, or a resumable store of the run ``meta``."""
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not an activation store folder")
        if not path.exists() or not [p for p in path.iterdir() if p.name != LOCK_NAME]:
            return
        if not (path / "meta.json").is_file():
            raise StoreError(f"{path} is not empty and is not an activation store (no meta.json); pass a new or "
                             "empty folder (nothing in it was changed)")
        old = cls._read_meta(path)
        if old["format"] in READ_ONLY_FORMATS:
            raise StoreError(f"store {path} was written in an older format ({old['format']}); it can be read but "
                             "not resumed: use a new path")
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise StoreError(f"store {path} holds a different run (differs in: {', '.join(diff)}); "
                             "use a new path or delete it")

    @classmethod
    def _create(cls, path: Path, meta: dict, transcripts: list[dict]) -> ActivationStore:
        written: list[Path] = []
        try:
            for name, write in (("meta.json", lambda p: save_json(meta, p, indent=1, sort_keys=True)),  # marks a store
                                ("transcripts.jsonl", lambda p: write_lines(p, [
                                    json.dumps(t, sort_keys=True, ensure_ascii=False) for t in transcripts])),
                                ("manifest.json", lambda p: save_json({"shards": []}, p, indent=1, sort_keys=True))):
                write(path / name)
                written.append(path / name)
            (path / "shards").mkdir(exist_ok=True)
        except BaseException:
            for f in written[::-1]:
                f.unlink(missing_ok=True)
            raise
        return cls(path, meta, {"shards": []}, transcripts)

    @classmethod
    def _resume(cls, path: Path, meta: dict, transcripts: list[dict]) -> ActivationStore:
        """Reopen a store of this run under the lock: take over the rank locks of a killed
        distributed job (refusing one a live process holds), sweep a killed writer's temporaries,
        fold in the manifest parts a killed job's ranks left, verify every listed shard, and drop
        the missing or corrupt ones (they are computed again)."""
        cls._check_claim(path, meta)  # again, now that no other writer can change it
        for f in sorted(path.glob(".writer-rank*.lock")):
            if RANK_LOCK.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                WriterLock(path, f.name).acquire().release()  # raises if a live rank holds it
        for folder in (path, path / "shards"):
            for tmp in folder.glob(f".*{TMP_SUFFIX}") if folder.is_dir() else ():
                if _TEMPORARY.fullmatch(tmp.name) and tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink()
        if (path / "transcripts.jsonl").exists():
            if _read_transcripts(path, meta) != transcripts:
                raise StoreError(f"store {path} was made from different transcripts; use a new path")
        else:  # a writer killed while creating the store
            write_lines(path / "transcripts.jsonl", [json.dumps(t, sort_keys=True, ensure_ascii=False)
                                                     for t in transcripts])
        manifest = {"shards": []}
        if (path / "manifest.json").exists():
            manifest = _read_json(path, "manifest.json")
            check_manifest(manifest, meta, f"store {path}: manifest.json")
        (path / "shards").mkdir(exist_ok=True)
        parts = _read_parts(path, meta)
        store = cls(path, meta, manifest, transcripts)
        store.manifest = {"shards": store._sound(_fold(manifest["shards"], parts), True, "computing it again")}
        if store.manifest != manifest:  # what every rank of a job reads as done
            save_json(store.manifest, path / "manifest.json", indent=1, sort_keys=True)
        for f, _ in parts:
            f.unlink()
        return store

    @classmethod
    @contextmanager
    def writing_rank(cls, path: str | Path, meta: dict, transcripts: list[dict], rank: int
                     ) -> Iterator[ActivationStore]:
        """Hold the store at ``path`` as rank ``rank`` of a distributed job whose rank 0 holds it
        through :meth:`writing` (which made or resumed it): the rank's own lock
        (``.writer-rank{R}.lock``) until the block ends, the finished shards as ``manifest.json``
        lists them, and the shards this rank writes recorded in its own manifest part
        (``manifest.rank{R}.json``) for rank 0 to merge (:meth:`merge_parts`)."""
        path = Path(path)
        meta = {"format": FORMAT, **meta}
        lock = WriterLock(path, rank_lock_name(rank)).acquire()
        try:
            cls._check_claim(path, meta)  # this rank's run is the run rank 0 claimed the store for
            if _read_transcripts(path, meta) != transcripts:
                raise StoreError(f"store {path} was made from other transcripts than rank {rank} was given")
            manifest = _read_json(path, "manifest.json")
            check_manifest(manifest, meta, f"store {path}: manifest.json")
            store = cls(path, meta, manifest, transcripts)
            store._lock, store._part = lock, path / part_name(rank)
            yield store
        finally:
            lock.release()

    def merge_parts(self) -> None:
        """Fold the manifest parts the ranks of a job wrote into ``manifest.json`` (one atomic
        write), then delete them. Only by the holder of the store (:meth:`writing`), once every
        rank has stopped writing; a part's shard that does not match its entry is dropped with a
        warning (computed again on resuming)."""
        self._check_held()
        parts = _read_parts(self.path, self.meta)
        if not parts:
            return
        self.manifest = {"shards": self._sound(_fold(self.manifest["shards"], parts), False,
                                               "it will be computed again")}
        save_json(self.manifest, self.path / "manifest.json", indent=1, sort_keys=True)
        for f, _ in parts:
            f.unlink()

    def done(self) -> set[int]:
        """Indices of finished shards."""
        return {e["index"] for e in self.manifest["shards"]}

    def write_shard(self, index: int, part: Activations, transcript_range: tuple[int, int]) -> None:
        """Write one shard atomically, then record it in the manifest (only inside
        :meth:`writing`, which holds the writer lock)."""
        self._check_held()
        name = shard_name(index)
        tensors = {"activations": part.acts.contiguous()}
        for k in ROW_COLUMNS:
            tensors[k] = torch.as_tensor(np.ascontiguousarray(part.rows[k]), dtype=torch.int64)
        final = self.path / name
        with atomic_path(final) as tmp:
            save_file(tensors, str(tmp), metadata=header_metadata(self.meta, [sel.name for sel in part.selectors]))
        entry = {"index": index, "file": name, "rows": len(part), "transcripts": list(transcript_range),
                 "bytes": final.stat().st_size, "sha256": _sha256(final)}
        shards = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.manifest = {"shards": sorted(shards, key=lambda e: e["index"])}
        if self._part is None:
            save_json(self.manifest, self.path / "manifest.json", indent=1, sort_keys=True)
        else:
            mine = [e for e in self._written if e["index"] != index] + [entry]
            self._written = sorted(mine, key=lambda e: e["index"])
            save_json({"shards": self._written}, self._part, indent=1, sort_keys=True)

    def _check_held(self) -> None:
        if self._lock is None or not self._lock.held:
            raise StoreError(f"store {self.path} is not held for writing; write through ActivationStore.writing()")
