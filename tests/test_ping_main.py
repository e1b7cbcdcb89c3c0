"""``python -m interp.ping`` on the shipped organism, tiny settings (interp.ping.__main__)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import same_results

from interp.figures import FIGURES, load_results
from interp.ping.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# The command


TINY = ["--rounds", "2", "--per-round", "2", "--n-per-label", "4", "--test-n-per-label", "3",
        "--screen-n-per-label", "3", "--probe-prefixes", "4", "--probe-n-per-label", "3", "--oversample", "3",
        "--steer-multiples", "0,1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ping") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out), "--json", *TINY]) == 0
    return out, json.loads(printed.getvalue())


def test_cli_prints_one_json_object_with_the_documented_keys(tiny_run, capsys):
    out, summary = tiny_run
    printed = json.loads((out / "ping.json").read_text())
    assert printed == json.loads(json.dumps(summary))
    assert isinstance(printed["best_prefix"], str) and printed["best_prefix"]
    assert isinstance(printed["validation"]["score"], float)
    for rate in (printed["test"]["harmful_refusal"], printed["test"]["benign_success"],
                 printed["baseline"]["no_defence"]["harmful_refusal"],
                 printed["baseline"]["no_defence"]["benign_success"], printed["baseline"]["aligned"]["harmful_refusal"]):
        assert set(rate) == {"value", "low", "high"} and rate["low"] <= rate["value"] <= rate["high"]
    assert printed["generations_used"] == 4
    assert "generations_to_match" in printed["probe_guided"]


def test_cli_writes_the_result_files_the_figures_read(tiny_run):
    out, _ = tiny_run
    results = load_results(out)
    behaviour = results["behaviour.json"]
    assert [c["key"] for c in behaviour["conditions"]] == [
        "aligned", "finetuned", "ping", "safety_system_prompt", "few_shot", "i_cant", "ping_as_suffix",
        "handwritten_safety_preamble", "neutral_opening", "steering"]
    assert (behaviour["n_harmful"], behaviour["n_benign"]) == (3, 3)
    assert [p["coefficient"] for p in results["steering.json"]["points"]][0] == 0.0
    for key in ("F1", "F5", "F8"):
        assert FIGURES[key](results).figure is not None


def test_a_killed_cli_run_restarted_resumes_and_ends_like_an_uninterrupted_one(tiny_run, tmp_path, capsys):
    whole, _ = tiny_run
    out = tmp_path / "run"
    history = out / "ping_history.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "interp.ping", "--out", str(out), *TINY, "--threads", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if history.exists() and '"kind": "candidate"' in history.read_text():
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert '"kind": "candidate"' in history.read_text()
    assert main(["--out", str(out), *TINY]) == 0
    assert "resuming the plain search" in capsys.readouterr().err
    assert history.read_text() == (whole / "ping_history.jsonl").read_text()
    assert (out / "behaviour.json").read_text() == (whole / "behaviour.json").read_text()


def test_cli_refuses_to_resume_a_folder_written_with_other_settings(tiny_run, capsys):
    out, _ = tiny_run
    args = [a if a != "4" else "5" for a in TINY]  # --n-per-label 5
    assert main(["--out", str(out), *args]) == 2
    assert "holds a run with other settings (n_per_label" in capsys.readouterr().err


FITTED_ON: list[set[str]] = []  # the task ids each monitor of the guard run was fitted and thresholded on


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory):
    """The tiny run with the guard table, steering tried at layer 2 only."""
    from interp.ping import guard_study

    out = tmp_path_factory.mktemp("ping") / "guards"
    real = guard_study.fit_monitor

    def spy(model, train, validation, **kw):
        FITTED_ON.append({t.id for t in train} | {t.id for t in validation})
        return real(model, train, validation, **kw)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(guard_study, "fit_monitor", spy)
        assert main(["--out", str(out), *TINY, "--guards", "--steer-layers", "2"]) == 0
    return out


def test_the_guard_table_holds_every_defence_and_its_thresholds_never_saw_the_test_split(guard_run, capsys):
    guards = json.loads((guard_run / "guards.json").read_text())
    assert [c["key"] for c in guards["conditions"]] == [
        "no_defence", "ping", "classifier_guard", "activation_monitor", "ping_classifier_guard",
        "ping_activation_monitor"]
    assert all("harmful_blocked" in c for c in guards["conditions"] if c["guard"])
    assert set(guards["monitor"]["recall"]) == {"test", "test_with_ping", "test_with_ping_monitor_fitted_without",
                                                "aligned_probe_transfer", "few_shot", "tool_observation"}
    assert len(FITTED_ON) == 3 and all(i.split("-")[0] in ("trai", "vali") for ids in FITTED_ON for i in ids)
    ping = json.loads((guard_run / "ping.json").read_text())
    assert ping["settings"]["steer_layers"] == [2] and ping["steering"]["layer"] == 2
    assert FIGURES["F9"](load_results(guard_run)).figure is not None
    from interp.ping.report import print_guards
    print_guards(guards)
    assert "activation monitor" in capsys.readouterr().out


REGRESSION = Path(__file__).parent / "data" / "regression" / "ping"


def test_results_equal_those_recorded_before_the_restructuring(tiny_run):
    """The same command and settings, run by the code before PING became a package over
    Model.hooks(); its files are in tests/data/regression/ping."""
    out, _ = tiny_run
    names = ("ping.json", "behaviour.json", "steering.json", "ping_history.jsonl", "ping_guided_history.jsonl")
    assert same_results(REGRESSION, out, names) == []
