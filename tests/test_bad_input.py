"""Bad input, one test per class (docs/bad-input.md has the table): each asserts the kind of
error, that its message names the file / record / field / value, and that nothing outside the
output (or store) folder changed and no partial output remains."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import agent_transcript
from safetensors.torch import load_file

from interp import cli
from interp.cache import cache_activations
from interp.compare import cache_conditions, class_array
from interp.demo import main as demo_main
from interp.figures import ResultError, load_results
from interp.figures.__main__ import main as figures_main
from interp.models import load_model
from interp.organism.__main__ import _parser as organism_parser
from interp.organism.__main__ import evaluate_organism
from interp.organism.__main__ import main as organism_main
from interp.ping.__main__ import main as ping_main
from interp.ping.loop import PingError, load_history
from interp.probe import main as probe_main
from interp.smollm2.__main__ import main as smollm2_main
from interp.store import LOCK_NAME, ActivationStore, StoreError, WriterLock
from interp.transcripts import TranscriptError, load_jsonl


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under ``root`` with its bytes: equal before and after means untouched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}


def one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr (the last line; progress bars of model loading aside)."""
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return load_model(tiny_dirs["llama"])


@pytest.fixture
def ts():
    return [agent_transcript(i, harmful=i % 2 == 0) for i in range(6)]


KW = dict(layers=[0, 2], shard_size=2, progress=False)


@pytest.fixture(scope="module")
def pristine(model, tmp_path_factory):
    """A finished store (3 shards) to copy for each test."""
    path = tmp_path_factory.mktemp("pristine") / "store"
    cache_activations(model, [agent_transcript(i, harmful=i % 2 == 0) for i in range(6)], store=path, **KW)
    return path


def dataset(path: Path, n: int, *, label=lambda i: i % 2 == 0, ids=None, long: int | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = "word " * 1500 if i == long else f"Please handle request number {i} for me"
            rec = {"id": f"t{i}" if ids is None else ids(i), "messages": [{"role": "user", "content": text}],
                   "labels": {"harmful": label(i)}}
            fh.write(json.dumps(rec) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Data loss and trust


def test_a_store_refuses_a_folder_that_is_not_its_own_and_touches_nothing(model, ts, pristine, tmp_path):
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "draft.tmp").write_text("keep me too")
    (foreign / "sub" / "x.tmp").write_text("and me")
    (foreign / "shards").mkdir()
    (foreign / "shards" / ".00001.safetensors.1.deadbeef.tmp").write_text("looks like a store's, is not")
    (tmp_path / "a_file").write_text("not a folder")
    shutil.copytree(pristine, tmp_path / "other_run")
    before = snapshot(tmp_path)
    for path, message in ((foreign, "is not empty and is not an activation store (no meta.json)"),
                          (tmp_path / "a_file", "is a file, not an activation store folder"),
                          (tmp_path / "other_run", "holds a different run (differs in: hook_names, layers)")):
        with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            cache_activations(model, ts, store=path, layers=[1], shard_size=2, progress=False)
        assert str(path) in str(e.value)
    assert snapshot(tmp_path) == before


def _edit(path: Path, name: str, fn) -> None:
    obj = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps(fn(obj)))


def _relabel(meta):
    return {**meta, "layers": [1, 2], "hook_names": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]}


@pytest.mark.parametrize("name, edit, message", [
    ("manifest.json", lambda m: {"shards": [{**m["shards"][0], "file": "../../x.safetensors"}] + m["shards"][1:]},
     r"manifest.json, shards\[0\].file: '../../x.safetensors' is not the store's file for shard 0"),
    ("manifest.json", lambda m: {"shards": m["shards"] + m["shards"][:1]},
     r"manifest.json, shards\[3\].index: shard 0 is listed twice"),
    ("manifest.json", lambda m: {}, r"manifest.json: missing field 'shards'"),
    ("manifest.json", lambda m: {"shards": [{k: v for k, v in e.items() if k != "sha256"} for e in m["shards"]]},
     r"manifest.json, shards\[0\]: missing field 'sha256'"),
    ("meta.json", _relabel, r"shard shards/00000.safetensors: holds layers \[0, 2\], meta.json says \[1, 2\]"),
    ("meta.json", lambda m: {**m, "layers": [1, 2]}, r"meta.json.hook_names: .* do not name layers \[1, 2\]"),
    ("meta.json", lambda m: {**m, "dtype": "int8"}, r"meta.json.dtype: 'int8' is not one of float32"),
    ("meta.json", lambda m: {k: v for k, v in m.items() if k != "selector"}, r"meta.json: missing field 'selector'"),
])
def test_a_store_is_validated_against_its_schema_on_open(pristine, tmp_path, name, edit, message):
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    (tmp_path / "x.safetensors").write_bytes((store / "shards" / "00000.safetensors").read_bytes())
    _edit(store, name, edit)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=message) as e:
        ActivationStore.open(store)
    assert str(e.value).startswith(f"store {store}") and len(str(e.value).splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_resuming_computes_missing_and_corrupt_shards_again_so_the_hint_never_loops(model, ts, pristine, tmp_path,
                                                                                     monkeypatch):
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    (store / "shards" / "00001.safetensors").unlink()  # as the old message suggested
    shard2 = store / "shards" / "00002.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:-4] + b"\0\0\0\0")  # same size, other bytes
    with pytest.raises(StoreError, match="shard shards/00001.safetensors is missing; run cache_activations") as e:
        ActivationStore.open(store)
    assert f"store={str(store)!r}) again with the same arguments" in str(e.value)
    ran = []
    real = type(model).residual
    monkeypatch.setattr(type(model), "residual", lambda self, ids, *a, **k: ran.append(len(ids)) or
                        real(self, ids, *a, **k))
    with pytest.warns(UserWarning, match="computing it again"):
        cache_activations(model, ts, store=store, **KW)  # the hint, followed once
    assert sum(ran) == 4  # shards 1 and 2 only, after verifying shard 0
    assert snapshot(store) == snapshot(pristine)


def test_a_second_writer_is_refused_naming_the_pid_and_the_first_finishes(model, ts, pristine, tmp_path, monkeypatch):
    store = tmp_path / "s"
    seen = []
    real = ActivationStore.write_shard

    def write_and_race(self, index, part, rng):
        if index == 0:  # another writer arrives while this one is writing
            with pytest.raises(StoreError, match=f"store {store} is being written by pid {os.getpid()}"):
                cache_activations(model, ts, store=store, **KW)
            seen.append(index)
        real(self, index, part, rng)

    monkeypatch.setattr(ActivationStore, "write_shard", write_and_race)
    cache_activations(model, ts, store=store, **KW)
    assert seen == [0] and snapshot(store) == snapshot(pristine)  # lock file gone, bytes as if alone

    (store / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "gone"}))  # a killed writer's
    with WriterLock(store) as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()  # taken over
    assert not (store / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------
# Silent acceptance


@pytest.mark.parametrize("value, shown", [(None, "null"), (float("nan"), "NaN"), ("false", "'false'"),
                                          ("yes", "'yes'"), (0.0, "0.0")])
def test_labels_used_as_classes_must_be_booleans_or_0_1(tmp_path, capsys, value, shown):
    data = dataset(tmp_path / "d.jsonl", 12, label=lambda i: value if i == 3 else i % 2 == 0)
    before = snapshot(tmp_path)
    assert probe_main(["--layer", "0", "--dataset", str(data), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert all(part in line for part in (str(data), "record 4 (line 4)", "'t3'", "labels.harmful", shown)), line
    assert snapshot(tmp_path) == before
    with pytest.raises(ValueError, match=r"harmful must be booleans \(or 0/1\), got dtype <U5"):
        class_array(np.array(["false", "true"]), "harmful")


def test_activations_labels_read_as_classes_name_the_transcript(model, ts):
    acts = cache_activations(model, ts[:2], layers=[0], progress=False)
    assert acts.binary_labels("harmful", per="transcript").tolist() == [True, False]
    broken = dataclasses.replace(acts, transcripts=({**acts.transcripts[0], "labels": {"harmful": "no"}},
                                                    acts.transcripts[1]))
    with pytest.raises(ValueError, match=r"transcript 'agent-0', labels.harmful: label value 'no' is not a class"):
        broken.binary_labels("harmful")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "int8", "float"])
def test_only_floating_storage_dtypes_are_accepted(model, ts, tmp_path, dtype):
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"dtype .* cannot hold activations: use a floating dtype \(float32"):
        cache_activations(model, ts, store=tmp_path / "s", dtype=dtype, **KW)
    assert snapshot(tmp_path) == before


def test_a_floating_dtype_name_is_accepted(model, ts, tmp_path):
    st = cache_activations(model, ts[:2], store=tmp_path / "s", dtype="float16", layers=[0], progress=False)
    assert st.meta["dtype"] == "float16" and st.load().acts.dtype == torch.float16


def test_an_empty_or_whitespace_prefix_is_an_input_error_of_its_own(model, ts, tmp_path, capsys):
    before = snapshot(tmp_path)
    for prefix in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match=re.escape(f"the prefix {prefix!r} is empty or only whitespace")):
            cache_conditions(model, model, ts, prefix, layers=[0], progress=False)
        for command, argv in ((probe_main, ["--layer", "0"]), (organism_main, ["evaluate"])):
            with pytest.raises(SystemExit) as e:
                command([*argv, "--prefix", prefix])
            assert e.value.code == 2 and f"argument --prefix: the prefix {prefix!r} is empty" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_numpy_integer_layers_are_layers(model, ts):
    plain = cache_activations(model, ts[:2], layers=[0, 2], progress=False)
    for layers in (np.array([0, 2]), [np.int64(0), np.int32(2)], np.arange(0, 3, 2)):
        acts = cache_activations(model, ts[:2], layers=layers, progress=False)
        assert acts.layers == (0, 2) and torch.equal(acts.acts, plain.acts)
    assert cache_activations(model, ts[:2], layers=np.int64(-1), progress=False).layers == (2,)


# --------------------------------------------------------------------------------------------
# Errors that point the wrong way, or come too late


def _pickle_only_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def test_every_cli_reports_one_line_with_status_2_and_no_traceback(tiny_dirs, tmp_path, capsys, monkeypatch):
    pickled = _pickle_only_copy(tiny_dirs["llama"], tmp_path / "pickled")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("AGENT_REFUSAL_CACHE", str(tmp_path / "empty-cache"))
    before = snapshot(tmp_path)
    cases = [
        (organism_main, ["evaluate", "--checkpoints", "MISSING"], "MISSING/organism: no checkpoint there"),
        (ping_main, ["--checkpoints", "MISSING", "--out", str(tmp_path / "pout")], "MISSING/organism: no checkpoint"),
        (ping_main, ["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'}: exists and is not a folder"),
        (probe_main, ["--layer", "0", "--aligned", str(pickled), "--n-per-label", "10", "--out", str(tmp_path / "po")],
         f"{pickled}: the weights are pickle files (pytorch_model.bin)"),
        (figures_main, ["--results", str(tmp_path / "none"), "--out", str(tmp_path / "figs")], "no such results"),
        (demo_main, ["--out", str(tmp_path / "file" / "x"), "--stages", "figures"], "cannot be made"),
        (smollm2_main, ["path"], "SmolLM2 checkpoint"),
    ]
    for command, argv, message in cases:
        assert command(argv) == 2, argv
        assert message in one_error_line(capsys), argv
    assert snapshot(tmp_path) == before  # no output folder made, none left
    with pytest.raises(cli.UsageError):  # --debug: the traceback
        ping_main(["--out", str(tmp_path / "file"), "--debug"])
    with pytest.raises(ValueError, match="pickle"):
        load_model(pickled)
    assert load_model(pickled, allow_pickle=True).n_layers == 3  # asked for explicitly


def test_files_that_are_not_utf8_are_named(pristine, tmp_path):
    bad = b'{"a": "\xff"}\n'
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    (store / "meta.json").write_bytes(bad)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "behaviour.json").write_bytes(bad)
    (tmp_path / "history.jsonl").write_bytes(bad)
    (tmp_path / "t.jsonl").write_bytes(bad)
    before = snapshot(tmp_path)
    for kind, call, name in ((StoreError, lambda: ActivationStore.open(store), "meta.json"),
                             (ResultError, lambda: load_results(tmp_path / "results"), "behaviour.json"),
                             (PingError, lambda: load_history(tmp_path / "history.jsonl"), "history.jsonl"),
                             (TranscriptError, lambda: load_jsonl(tmp_path / "t.jsonl"), "t.jsonl")):
        with pytest.raises(kind, match="not valid UTF-8|not UTF-8") as e:
            call()
        assert name in str(e.value)
    assert snapshot(tmp_path) == before


def test_checks_that_can_fail_before_any_work_run_first(tiny_dirs, tmp_path, capsys):
    d = tiny_dirs["llama"]
    (tmp_path / "file").write_text("x")
    ten = dataset(tmp_path / "ten.jsonl", 10)
    same = dataset(tmp_path / "same.jsonl", 12, ids=lambda i: "same")
    long = dataset(tmp_path / "long.jsonl", 24, long=5)
    out = ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    # --aligned names no model: a check that ran after loading would report that instead
    for argv, message in (
            (["--dataset", str(ten), *out], "on the training side (test_size 0.3); choosing C by 5-fold grouped "
                                            "cross-validation needs 5 of each in 5 groups there"),
            (["--dataset", str(same), *out],
             f"{same}: transcript id 'same' is used 12 times ({same}, record 1 (line 1);"),
            (["--dataset", str(ten), "--out", str(tmp_path / "file" / "out")], "cannot be made"),
    ):
        assert probe_main(["--layer", "0", "--aligned", "./no/model", *argv]) == 2
        assert message in one_error_line(capsys), argv
    with pytest.raises(SystemExit):
        probe_main(["--layer", "0", "--test-size", "0"])
    assert "argument --test-size: expected a fraction" in one_error_line(capsys)
    common = ["--layer", "0", "--aligned", str(d), "--finetuned", str(d), "--dataset", str(long), "--prefix", "Sure",
              "--batch-size", "1", *out, "--json"]
    assert probe_main(common) == 2
    assert f"{long}, record 6 (line 6), transcript 't5': renders to" in one_error_line(capsys)
    assert probe_main([*common, "--no-behaviour"]) == 2
    assert "longer than the context of" in (line := one_error_line(capsys)) and "--truncate" in line
    assert snapshot(tmp_path) == before
    assert probe_main([*common, "--no-behaviour", "--truncate"]) == 0  # the flag the message names
    capsys.readouterr()
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["n_transcripts"] == 24


def test_negative_counts_are_errors_and_all_is_spelled_out(tmp_path, capsys):
    before = snapshot(tmp_path)
    for command, argv in ((organism_main, ["evaluate", "--n-per-label", "-1"]),
                          (ping_main, ["--test-n-per-label", "-3", "--out", str(tmp_path / "p")]),
                          (probe_main, ["--layer", "0", "--n-per-label", "0"]),
                          (ping_main, ["--rounds", "-1", "--out", str(tmp_path / "p")])):
        with pytest.raises(SystemExit) as e:
            command(argv)
        assert e.value.code == 2 and "expected" in one_error_line(capsys)
    with pytest.raises(ValueError, match="n_per_label must be 0 .* got -1"):
        evaluate_organism(n_per_label=-1)
    assert organism_parser().parse_args(["evaluate", "--n-per-label", "all"]).n_per_label == 0
    assert snapshot(tmp_path) == before
