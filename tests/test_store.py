"""The on-disk activation store: round trip, resume after a kill, corruption, mismatched runs."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from conftest import agent_transcript

from interp import store as store_mod
from interp.cache import cache_activations
from interp.models import load_model
from interp.store import ActivationStore, StoreError


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return load_model(tiny_dirs["llama"], backend="hf")


@pytest.fixture
def ts():
    return [agent_transcript(i, prefix="As a careful agent, I" if i % 3 == 0 else None, harmful=i % 2 == 0)
            for i in range(10)]


def files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_store_round_trips_what_memory_holds(model, ts, tmp_path):
    mem = cache_activations(model, ts, layers=[0, 2], positions="decision+last:user", batch_size=4, progress=False)
    st = cache_activations(model, ts, layers=[0, 2], positions="decision+last:user", batch_size=4,
                           store=tmp_path / "s", shard_size=4, progress=False)
    assert st.complete and st.n_shards == 3
    back = ActivationStore.open(tmp_path / "s").load()
    torch.testing.assert_close(back.acts, mem.acts, atol=1e-5, rtol=0)  # other batches, other rounding
    assert back.selectors == mem.selectors and back.layers == (0, 2)
    assert all((back.rows[k] == mem.rows[k]).all() for k in mem.rows)
    assert back.meta["hook_names"] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert torch.equal(ActivationStore.open(tmp_path / "s").load(layers=[2]).acts[:, 0], back.acts[:, 1])


def test_store_rows_read_as_a_hf_dataset(model, ts, tmp_path):
    st = cache_activations(model, ts, layers=[1], store=tmp_path / "s", shard_size=4, progress=False)
    ds = st.rows()
    assert ds.num_rows == 10 and ds[3]["transcript_id"] == "agent-3"
    assert json.loads(ds[0]["labels"]) == {"harmful": True} and ds[0]["selector"] == "decision"


def test_a_killed_run_resumes_without_recomputing_and_ends_identical(model, ts, tmp_path, monkeypatch):
    kw = dict(layers="all", positions="decision+mean:user", batch_size=3, shard_size=3, progress=False)
    cache_activations(model, ts, store=tmp_path / "full", **kw)

    real_write = ActivationStore.write_shard
    written = []

    def write_then_die(self, index, part, rng):
        if len(written) == 2:
            raise KeyboardInterrupt  # the kill arrives while shard 2 is being computed/written
        real_write(self, index, part, rng)
        written.append(index)

    monkeypatch.setattr(ActivationStore, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, ts, store=tmp_path / "killed", **kw)
    partial = ActivationStore.open(tmp_path / "killed")
    assert not partial.complete and partial.done() == {0, 1}
    with pytest.raises(StoreError, match="incomplete"):
        partial.load()

    monkeypatch.setattr(ActivationStore, "write_shard", real_write)
    calls = []
    real_residual = type(model).residual
    monkeypatch.setattr(type(model), "residual", lambda self, ids, *a, **k: calls.append(len(ids)) or
                        real_residual(self, ids, *a, **k))
    cache_activations(model, ts, store=tmp_path / "killed", **kw)
    assert sum(calls) == 4  # only transcripts of shards 2 and 3 were run again
    assert files(tmp_path / "killed") == files(tmp_path / "full")


def test_a_corrupted_shard_is_refused_clearly(model, ts, tmp_path):
    cache_activations(model, ts, store=tmp_path / "s", shard_size=4, progress=False)
    shard = tmp_path / "s" / "shards" / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data; the size stays the same
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard shards/00001\.safetensors is corrupt \(sha256"):
        ActivationStore.open(tmp_path / "s")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match=r"00001\.safetensors is corrupt \(100 bytes"):
        ActivationStore.open(tmp_path / "s", verify=False)
    shard.unlink()
    with pytest.raises(StoreError, match=r"00001\.safetensors is missing"):
        ActivationStore.open(tmp_path / "s")


def test_deleting_a_corrupt_shard_and_rerunning_repairs_the_store(model, ts, tmp_path):
    kw = dict(store=tmp_path / "s", shard_size=4, progress=False)
    cache_activations(model, ts, **kw)
    before = files(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"] = [e for e in manifest["shards"] if e["index"] != 1]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "s" / "shards" / "00001.safetensors").unlink()
    cache_activations(model, ts, **kw)
    assert files(tmp_path / "s") == before


def test_a_store_holding_a_different_run_is_not_overwritten(model, ts, tmp_path):
    cache_activations(model, ts, layers=[0], store=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="holds a different run \\(differs in: hook_names, layers\\)"):
        cache_activations(model, ts, layers=[1], store=tmp_path / "s", progress=False)


def test_missing_or_corrupt_metadata_is_named(tmp_path):
    with pytest.raises(StoreError, match="no activation store at"):
        ActivationStore.open(tmp_path / "nowhere")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="meta.json is corrupt"):
        ActivationStore.open(tmp_path / "s")


def test_no_temporary_files_are_left_behind(model, ts, tmp_path):
    cache_activations(model, ts, store=tmp_path / "s", shard_size=4, progress=False)
    assert not [p for p in (tmp_path / "s").rglob("*") if p.name.endswith(".tmp")]
    assert not (tmp_path / "s" / store_mod.LOCK_NAME).exists()  # the writer lock goes with its writer
    assert store_mod.FORMAT in (tmp_path / "s" / "meta.json").read_text()


def test_a_format_1_store_is_read_but_not_resumed(model, ts, tmp_path):
    path = tmp_path / "s"
    mem = cache_activations(model, ts, layers=[0, 2], store=path, shard_size=4, progress=False).load()
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format": "agent-refusal-interp/activations/1"}))
    manifest = json.loads((path / "manifest.json").read_text())
    for e in manifest["shards"]:  # as format 1 wrote them: the selector list alone in the header
        f = path / e["file"]
        with safe_open(f, framework="pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
            selectors = json.loads(h.metadata()["shard"])["selectors"]
        save_file(tensors, str(f), metadata={"selectors": json.dumps(selectors)})
        e["bytes"], e["sha256"] = f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    back = ActivationStore.open(path).load()
    assert torch.equal(back.acts, mem.acts) and back.selectors == mem.selectors
    before = files(path)
    with pytest.raises(StoreError, match=r"older format \(agent-refusal-interp/activations/1\); it can be read but "
                                         "not resumed"):
        cache_activations(model, ts, layers=[0, 2], store=path, shard_size=4, progress=False)
    assert files(path) == before
