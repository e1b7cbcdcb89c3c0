"""`python -m interp.probe`: runs on the organism offline and fails clearly on bad input."""

import json
import subprocess
import sys

import pytest

from interp.probe import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "interp.probe", *args], capture_output=True, text=True, timeout=600)


def test_probe_cli_on_the_organism_prints_one_json_object(tmp_path):
    out = run_cli("--layer", "1", "--n-per-label", "24", "--json", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    (rec,) = res["layers"]
    assert rec["layer"] == 1
    for key in ("aligned", "finetuned", "prefix", "transfer_to_finetuned", "transfer_to_prefix"):
        assert 0.0 <= rec[key]["acc"] <= 1.0
    assert set(rec["decision_logit"]) == {"aligned", "finetuned", "prefix"}
    assert res["n_transcripts"] == 48 and res["prefix"]
    assert json.loads((tmp_path / "comparison.json").read_text())["layers"] == res["layers"]


def test_probe_cli_prints_a_table_per_layer(tmp_path, capsys):
    assert main(["--layer", "all", "--n-per-label", "12", "--no-behaviour", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "aligned probe" in text and "written:" in text


@pytest.mark.parametrize("args, message", [
    (["--layer", "99"], "--layer 99 is out of range: the model has"),
    (["--layer", "x"], "--layer must be an integer"),
    (["--layer", "0", "--aligned", "./no/such/model"], "no model at './no/such/model'"),
])
def test_bad_arguments_exit_nonzero_with_one_clear_line(args, message, tmp_path):
    out = run_cli(*args, "--out", str(tmp_path))
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]


def test_an_empty_dataset_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = run_cli("--layer", "0", "--dataset", str(empty), "--out", str(tmp_path))
    assert out.returncode == 2 and "no transcripts in file" in out.stderr


def test_early_stopped_refusals_equal_the_judge_on_whole_replies():
    """Early-stopped refusal labels equal the judge on whole 48-token replies, on tasks where the
    organism does refuse (the aligned model, and the fine-tuned one with a safety opening)."""
    from interp.behavior import RefusalJudge, parse_reply
    from interp.generation import generate
    from interp.models import load_model
    from interp.organism import World, checkpoint_path, grammar
    from interp.probe import REPLY_TOKENS, refusals

    ts = [t.transcript() for t in World(0).sample("test", 8)]
    opening = grammar.heldout_preamble("safety", "test")
    judge = RefusalJudge()
    for name, run in (("organism", ts), ("organism-finetuned", [t.with_prefix(opening) for t in ts])):
        model = load_model(checkpoint_path(name))
        whole = generate(model, run, max_new_tokens=REPLY_TOKENS)
        expected = [judge(parse_reply(g.text).content) for g in whole]
        assert any(expected) and not all(expected)
        assert refusals(model, run).tolist() == expected
