"""Cached activations in memory (:class:`Activations`) and on disk (:class:`ActivationStore`).

An activation store is a directory::

    meta.json            what was cached: model, backend, layers, hook names, site, selector, dtype
    transcripts.jsonl    one line per transcript: index, id, labels, token count
    shards/00000.safetensors   activations [rows, n_layers, d_model] plus per-row columns; the
                         header also records the layers and the site
    manifest.json        finished shards with their sizes and sha256

- **Atomic, resumable, deterministic.** Every file is written under a temporary name and renamed,
  and the manifest is rewritten after each shard, so a run killed mid-way leaves only whole
  shards; :func:`interp.cache.cache_activations` pointed at the same directory resumes (verifying
  the finished shards and computing missing or corrupt ones again) and ends with the same bytes
  as an uninterrupted run.
- **Validated.** :meth:`ActivationStore.open` checks the three files against a schema and every
  shard against the manifest and its own header (:mod:`.schema`), reporting the first problem in
  one line.
- **One store from several processes.** Under ``torchrun`` / ``accelerate launch`` the ranks of
  the job each write their own shards into one store, which ends byte for byte as one process
  writes it (:mod:`.ranks`; docs/distributed.md).
- **Never touches what is not its own.** A writer refuses a folder that is neither empty nor a
  store, a store of another run, and a store another process is writing (:mod:`.lock`), before
  changing anything; the only files it ever deletes are its own temporary files.
"""

from interp.store.activations import ROW_COLUMNS, Activations, concat
from interp.store.disk import ActivationStore
from interp.store.lock import LOCK_NAME, WriterLock
from interp.store.ranks import RankError
from interp.store.schema import FLOAT_DTYPES, FORMAT, READ_ONLY_FORMATS, StoreError

__all__ = ["FLOAT_DTYPES", "FORMAT", "LOCK_NAME", "READ_ONLY_FORMATS", "ROW_COLUMNS", "ActivationStore", "Activations",
           "RankError", "StoreError", "WriterLock", "concat"]
