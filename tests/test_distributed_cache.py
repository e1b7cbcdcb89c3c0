"""Data-parallel caching: the ranks of a ``torchrun`` job write, byte for byte, the store one
process writes; a killed or failed job resumes without redoing finished shards; an error on one
rank ends every rank with a clear message, never a hang.

One ``torchrun --standalone --nproc-per-node 2`` job (gloo, CPU) runs every scenario in turn (this
file is also its worker script: each start of the toolkit costs seconds), and the tests read
what it left. Run as a script under torchrun: ``python tests/test_distributed_cache.py MODEL WORK``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from conftest import agent_transcript

from interp.atomic import atomic_path, save_json
from interp.cache import cache_activations
from interp.models import Model, load_model
from interp.store import ActivationStore, StoreError, WriterLock

N_TRANSCRIPTS = 12
KW = dict(layers="all", positions="decision+mean:user", batch_size=2, shard_size=2, progress=False)
"""Six shards of two transcripts: rank 0 owns shards 0, 2, 4; rank 1 owns 1, 3, 5."""
JOB_TIMEOUT = 240  # seconds; the job takes about 25 on two busy cores
OLD = 1_600_000_000 * 10**9  # an mtime (ns) no shard written today has


def transcripts():
    return [agent_transcript(i, prefix="As a careful agent, I" if i % 3 == 0 else None, harmful=i % 2 == 0)
            for i in range(N_TRANSCRIPTS)]


def files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def count_forwards() -> list[int]:
    """Transcripts per forward pass of any model in this process, appended as they run."""
    calls: list[int] = []
    real = Model.residual
    Model.residual = lambda self, ids, *a, **k: calls.append(len(ids)) or real(self, ids, *a, **k)
    return calls


def left_by_a_killed_job(ref: Path, dst: Path) -> None:
    """A copy of the finished store ``ref`` as a killed 2-rank job (resuming an older store)
    leaves it: shards 0, 1 merged in manifest.json, shard 2 in rank 0's manifest part, 3 in rank
    1's, shard 4 missing, shard 5 half-written but never recorded, temporaries and the dead job's
    lock files (one from a rank the next job does not have). Shards 0-3 get an old mtime."""
    shutil.copytree(ref, dst)
    entries = {e["index"]: e for e in json.loads((ref / "manifest.json").read_text())["shards"]}
    save_json({"shards": [entries[0], entries[1]]}, dst / "manifest.json", indent=1, sort_keys=True)
    save_json({"shards": [entries[2]]}, dst / "manifest.rank0.json", indent=1, sort_keys=True)
    save_json({"shards": [entries[3]]}, dst / "manifest.rank1.json", indent=1, sort_keys=True)
    (dst / "shards" / "00004.safetensors").unlink()
    shard5 = dst / "shards" / "00005.safetensors"
    shard5.write_bytes(shard5.read_bytes()[:200])
    (dst / "shards" / ".00004.safetensors.4242.0123abcd.tmp").write_bytes(b"half")
    (dst / ".manifest.rank1.json.4242.0123abcd.tmp").write_text('{"shar')
    for lock in (".writer.lock", ".writer-rank0.lock", ".writer-rank1.lock", ".writer-rank3.lock"):
        (dst / lock).write_text(json.dumps({"pid": 4242, "host": "gone"}))
    for k in range(4):
        os.utime(dst / "shards" / f"{k:05d}.safetensors", ns=(OLD, OLD))


# --------------------------------------------------------------------------------------------
# The worker: every scenario, in order, on every rank


def _record(work: Path, name: str, rank: int, value) -> None:
    save_json(value, work / f"{name}.rank{rank}.json")


def worker(model_dir: str, work: Path) -> None:
    rank = int(os.environ["RANK"])
    model = load_model(model_dir, backend="hf")
    ts = transcripts()
    calls = count_forwards()

    cache_activations(model, ts, store=work / "fresh", **KW)
    _record(work, "fresh", rank, calls[:])

    acts = cache_activations(model, ts, **KW)
    with atomic_path(work / f"memory.rank{rank}.safetensors") as tmp:
        save_file({"acts": acts.acts, **{k: torch.as_tensor(v) for k, v in acts.rows.items()}}, str(tmp),
                  metadata={"selectors": json.dumps([s.name for s in acts.selectors])})

    before = len(calls)
    cache_activations(model, ts, store=work / "killed", **KW)
    _record(work, "killed", rank, calls[before:])

    real = Model.residual  # the counting one

    def fail_on_rank_1s_second_shard(self, ids, *a, **k):
        if rank == 1 and len(calls) > before:
            raise RuntimeError("injected failure on rank 1")
        return real(self, ids, *a, **k)

    before = len(calls)
    Model.residual = fail_on_rank_1s_second_shard
    try:
        cache_activations(model, ts, store=work / "failed", **KW)
        _record(work, "failed", rank, "no error")
    except Exception as e:  # every rank must get here, and soon
        _record(work, "failed", rank, f"{type(e).__name__}: {e}")
    Model.residual = real
    if rank == 0:
        _record(work, "failed-left", rank, sorted(files(work / "failed")))
    cache_activations(model, ts, store=work / "failed", **KW)
    _record(work, "done", rank, True)

    try:
        cache_activations(model, ts, **{**KW, "batch_size": 2 if rank == 0 else 3})
        _record(work, "differ", rank, "no error")
    except Exception as e:
        _record(work, "differ", rank, f"{type(e).__name__}: {e}")

    try:
        cache_activations(model, ts, store=work / "never", **{**KW, "layers": [0] if rank == 0 else [99]})
    except Exception as e:
        _record(work, "never", rank, f"{type(e).__name__}: {e}")
        torch.distributed.barrier()  # both recorded before the launcher stops the job
        raise  # uncaught: the job ends with an error


# --------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return load_model(tiny_dirs["llama"], backend="hf")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """What one process writes (a store) and holds (in memory), with the job's thread count (one)."""
    out, threads = tmp_path_factory.mktemp("ref") / "store", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache_activations(model, transcripts(), store=out, **KW)
        return out, cache_activations(model, transcripts(), **KW)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def job(tiny_dirs, reference, tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    left_by_a_killed_job(reference[0], work / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INTERP_TEST_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tiny_dirs["llama"]), str(work)],
                          env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False)
    return {"ref": reference[0], "memory": reference[1], "work": work, "proc": proc}  # a hang: TimeoutExpired


def _read(job, name: str, rank: int):
    path = job["work"] / f"{name}.rank{rank}.json"
    assert path.exists(), f"rank {rank} never finished {name!r}:\n{job['proc'].stderr[-3000:]}"
    return json.loads(path.read_text())


def test_two_ranks_write_byte_for_byte_the_store_one_process_writes(job):
    assert files(job["work"] / "fresh") == files(job["ref"])
    assert _read(job, "fresh", 0) == [2, 2, 2] and _read(job, "fresh", 1) == [2, 2, 2]  # three shards each


def test_in_memory_every_rank_holds_what_one_process_computes(job):
    mem = job["memory"]
    for rank in (0, 1):
        with safe_open(job["work"] / f"memory.rank{rank}.safetensors", framework="pt") as f:
            assert torch.equal(f.get_tensor("acts"), mem.acts)
            assert all(torch.equal(f.get_tensor(k), torch.as_tensor(v)) for k, v in mem.rows.items())
            assert json.loads(f.metadata()["selectors"]) == [s.name for s in mem.selectors]


def test_a_killed_job_resumes_without_redoing_finished_shards(job):
    killed = job["work"] / "killed"
    assert files(killed) == files(job["ref"])  # parts merged, dead locks and temporaries gone
    assert [(killed / "shards" / f"{k:05d}.safetensors").stat().st_mtime_ns for k in range(4)] == [OLD] * 4
    assert _read(job, "killed", 0) == [2] and _read(job, "killed", 1) == [2]  # shard 4 on rank 0, 5 on rank 1


def test_a_failure_on_one_rank_raises_on_every_rank_and_the_store_resumes(job):
    assert _read(job, "failed", 1) == "RuntimeError: injected failure on rank 1"
    assert _read(job, "failed", 0) == ("RankError: rank 1 of 2 failed while caching: RuntimeError: injected "
                                       "failure on rank 1")
    left = _read(job, "failed-left", 0)  # rank 0's three shards and rank 1's first, merged; no part, no lock
    assert left == ["manifest.json", "meta.json", *(f"shards/{k:05d}.safetensors" for k in (0, 1, 2, 4)),
                    "transcripts.jsonl"]
    assert _read(job, "done", 0) and files(job["work"] / "failed") == files(job["ref"])


def test_ranks_given_different_arguments_are_refused_on_every_rank(job):
    for rank in (0, 1):
        assert _read(job, "differ", rank) == ("RankError: the ranks were given different runs (model, layers, site, "
                                              "selector, dtype, shards, batches, transcripts): rank 1's differ from "
                                              "rank 0's; every rank must make the same call")


def test_an_error_on_one_rank_before_any_work_ends_every_rank_clearly(job):
    layer = "ValueError: layer 99 is out of range: "
    assert _read(job, "never", 1).startswith(layer)  # rank 1's own error
    assert _read(job, "never", 0).startswith(f"RankError: rank 1 of 2 failed checking its inputs: {layer}")
    assert not (job["work"] / "never").exists()  # checked before anything was written
    assert job["proc"].returncode != 0 and layer in job["proc"].stderr  # raised: the launcher ends the job


# --------------------------------------------------------------------------------------------
# One process resuming what a job left (no launcher needed)


def test_one_process_resumes_a_store_a_killed_job_left(model, reference, tmp_path):
    left_by_a_killed_job(reference[0], tmp_path / "killed")
    real, threads = Model.residual, torch.get_num_threads()
    try:
        calls = count_forwards()
        torch.set_num_threads(1)
        cache_activations(model, transcripts(), store=tmp_path / "killed", **KW)
    finally:
        Model.residual = real
        torch.set_num_threads(threads)
    assert calls == [2, 2]  # shards 4 and 5 only
    assert files(tmp_path / "killed") == files(reference[0])


def test_a_rank_lock_a_live_process_holds_refuses_the_resume_and_changes_nothing(model, reference, tmp_path):
    left_by_a_killed_job(reference[0], tmp_path / "killed")
    (tmp_path / "killed" / ".writer-rank1.lock").unlink()
    before = files(tmp_path / "killed")
    with WriterLock(tmp_path / "killed", ".writer-rank1.lock"), \
            pytest.raises(StoreError, match=rf"store .*killed is being written by pid {os.getpid()}"):
        cache_activations(model, transcripts(), store=tmp_path / "killed", **KW)  # a rank of the old job lives
    after = files(tmp_path / "killed")
    assert {k: v for k, v in after.items() if "lock" not in k} == {k: v for k, v in before.items() if "lock" not in k}


def test_merging_parts_needs_the_store_held(reference):
    with pytest.raises(StoreError, match="not held for writing"):
        ActivationStore.open(reference[0]).merge_parts()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
