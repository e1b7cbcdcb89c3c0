"""The main job's later stages on the organism, small: comparison, attribution, figures, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import same_results

from interp.demo import main
from interp.organism import grammar
from interp.organism.placement import PLACEMENTS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    (out / "results").mkdir()
    (out / "results" / "ping.json").write_text(json.dumps({"best_prefix": grammar.heldout_preamble("safety", "test")}))
    argv = ["--out", str(out), "--figures", str(out / "figures"), "--stages", "comparison,attribution,figures",
            "--n-per-label", "12", "--attribution-n", "2", "--no-png", "--no-progress"]
    assert main(argv) == 0
    return out, argv


def test_comparison_stage_writes_every_layer_and_the_token_logits(run):
    res = run[0] / "results"
    comp = json.loads((res / "comparison.json").read_text())
    assert [r["layer"] for r in comp["layers"]] == [0, 1, 2, 3]
    tl = json.loads((res / "token_logits.json").read_text())
    ft, pre = tl["conditions"]["finetuned"], tl["conditions"]["prefix"]
    assert ft and len(ft) == len(pre)
    for a, b in zip(ft, pre):  # same transcript, the prefix appended: same logits up to the prefix
        assert b["kinds"][len(a["kinds"]):] == ["prefix"] * (len(b["kinds"]) - len(a["kinds"]))
        assert b["logits"][:len(a["logits"])] == pytest.approx(a["logits"], abs=1e-4)
    pca = json.loads((res / "pca.json").read_text())
    assert len(pca["conditions"]["aligned"]["x"]) == comp["n_transcripts"]


def test_attribution_stage_covers_both_labels_and_every_placement_and_model(run):
    att = json.loads((run[0] / "results" / "attribution.json").read_text())
    assert {"harmful", "benign", "agreement", "placement"} <= set(att)
    got = {(c["placement"], c["model"]) for c in att["placement"]["conditions"]}
    assert got == {(p, m) for p in PLACEMENTS for m in ("aligned", "finetuned", "prefix")}
    assert -1.0 <= att["agreement"]["pooled"] <= 1.0


def test_attribution_reads_the_comparisons_refusal_probes(run):
    res = run[0] / "results"
    readout = json.loads((res / "readout.json").read_text())
    comp = json.loads((res / "comparison.json").read_text())
    assert readout["kind"] == comp["logit_probe"] and readout["site"] == comp["site"]
    assert json.loads((res / "attribution.json").read_text())["layer"] == readout["layer"]
    d_model = len(readout["aligned"]["coef"])
    assert d_model == len(readout["finetuned"]["coef"]) and readout["aligned"] != readout["finetuned"]


def test_figures_stage_draws_what_the_results_allow(run):
    figs = run[0] / "figures"
    for stem in ("F3_probes", "F4_token_logits", "F6_attribution", "F7_pca", "F10_interactions"):
        assert (figs / f"{stem}.html").exists()
    assert not (figs / "F1_behaviour.html").exists()  # behaviour.json comes from the ping stage


def test_a_second_run_skips_finished_stages(run, capsys):
    out, argv = run
    before = (out / "results" / "comparison.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "comparison: done already" in capsys.readouterr().err
    assert (out / "results" / "comparison.json").stat().st_mtime_ns == before


def test_an_unknown_stage_is_named(capsys):
    assert main(["--stages", "organism,train"]) == 2
    assert "unknown stage(s) ['train']" in capsys.readouterr().err


REGRESSION = Path(__file__).parent / "data" / "regression" / "demo"


def test_stage_results_equal_those_recorded_before_the_restructuring(run):
    """The same stages and settings, run by the code before the restructuring (hooks, PING
    package, probes estimators); its files are in tests/data/regression/demo. attribution.json
    was recorded again when attribution began reading the comparison's refusal probes
    (readout.json) instead of fitting its own on training-split tasks; the other three are the
    restructuring's."""
    names = ("comparison.json", "pca.json", "token_logits.json", "attribution.json")
    assert same_results(REGRESSION, run[0] / "results", names) == []
