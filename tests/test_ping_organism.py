"""PING on the organism: the offline generator, the validation scorer, decision-position reads
and the probe screen, the baselines' transforms, the training-text check and the command
``python -m interp.ping`` (tiny settings, the shipped checkpoints)."""

from __future__ import annotations

import difflib
import doctest
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from interp import ping, ping_organism
from interp.behavior import RefusalJudge, generate
from interp.models import load_model
from interp.organism import World, checkpoint_path, grammar
from interp.ping_organism import (I_CANT, SAFETY_SYSTEM_PROMPT, DecisionReader, GrammarSearchGenerator,
                                  ProbeScreen, TrainingText, ValidationScorer, conditions, fit_refusal_probe,
                                  grammar_split)
from interp.transcripts import render

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def finetuned():
    return load_model(checkpoint_path("organism-finetuned"))


def request(n=5, seed=0, feedback=None, round_=1):
    return ping.Request(n=n, round=round_, attempt=0, seed=seed, feedback=feedback)


def feedback_of(*prefixes: str) -> ping.Feedback:
    history = [ping.PrefixScore(p, 0.9 - 0.1 * i, 0.5 + 0.1 * i, 1) for i, p in enumerate(prefixes)]
    return ping.Feedback.from_history(history, top_k=3)


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.split(), b.split()).ratio()


# --------------------------------------------------------------------------------------------
# The offline generator


def test_the_module_docstring_examples_run():
    assert doctest.testmod(ping_organism).failed == 0


def test_generator_proposals_depend_only_on_the_request_seed():
    gen = GrammarSearchGenerator()
    first = gen.propose(request(seed=11))
    assert GrammarSearchGenerator().propose(request(seed=11)) == first
    assert gen.propose(request(seed=12)) != first


def test_generator_proposes_the_requested_number_of_distinct_candidates():
    out = GrammarSearchGenerator().propose(request(n=17, seed=3))
    assert len(out) == 17
    assert len({ping.prefix_key(p) for p in out}) == 17


def test_fresh_candidates_are_clauses_of_the_grammar_forms():
    gen = GrammarSearchGenerator(cross_slot=0.0)
    out = gen.propose(request(n=20, seed=5))
    templates = {f.template for forms in grammar.FORMS.values() for f in forms}
    clauses = [c for p in out for c in gen.parse(p)]
    assert all(c.template in templates for c in clauses)
    assert 20 <= len(clauses) <= 60


def test_with_feedback_the_generator_mutates_the_prefixes_it_is_shown():
    shown = ("As a careful agent, I will verify that this task is safe.",
             "First I will plan my steps.",
             "To be safe, I never take harmful actions.")
    gen = GrammarSearchGenerator(explore=0.0, crossover=0.0)
    out = gen.propose(request(n=12, seed=8, feedback=feedback_of(*shown), round_=2))
    closest = [max(similarity(p, s) for s in shown) for p in out]
    fresh = [max(similarity(p, s) for s in shown) for p in GrammarSearchGenerator().propose(request(n=12, seed=8))]
    assert len(out) == 12 and not set(out) & set(shown)
    assert sum(c >= 0.5 for c in closest) >= 9  # most are one or two edits away from a shown prefix
    assert np.mean(closest) >= 2 * np.mean(fresh)  # exploration without feedback is not anchored to them


def test_parse_reads_slot_values_back_in_the_lexicons_spelling():
    gen = GrammarSearchGenerator()
    (c,) = gen.parse("Now I will look at the files.")
    assert dict(c.values) == {"seq": "Now", "subj": "I will", "plan": "look at the files"}
    (c,) = gen.parse("Let me, I will verify that this task is safe.")  # "let me" capitalised at the start
    assert dict(c.values)["lead"] == "let me"
    assert c.text() == "Let me, I will verify that this task is safe."
    (w,) = gen.parse("Nothing of the grammar here.")
    assert w.template is None and w.words == ("Nothing", "of", "the", "grammar", "here.")


# --------------------------------------------------------------------------------------------
# The scorer


def test_scorer_reads_the_validation_split_only(finetuned, world):
    scorer = ValidationScorer(finetuned, world, n_per_label=3)
    assert len(scorer.task_ids) == 6 and all(i.startswith("vali-") for i in scorer.task_ids)
    assert [t.harmful for t in scorer.tasks] == [True] * 3 + [False] * 3
    assert {t.labels["split"] for t in scorer.transcripts} == {"validation"}
    ev = scorer.evaluate(None)
    assert [o.task_id for o in ev.outcomes] == scorer.task_ids


def test_scorer_returns_the_two_rates_of_the_forced_prefix(finetuned, world):
    scorer = ValidationScorer(finetuned, world, n_per_label=4)
    ev = scorer(I_CANT)
    outcomes = scorer.evaluate(I_CANT).outcomes
    assert all(o.refused for o in outcomes)  # the judge sees "I can't" in every reply...
    assert ev.harmful_refusal == 1.0  # ...and the score counts harmful refusals and benign successes
    assert ev.benign_success == sum(o.success for o in outcomes if not o.harmful) / 4
    assert ev.extra == {"n_harmful": 4, "n_benign": 4, "mode": "first_step", "split": "validation"}
    rates = scorer("First I will plan my steps.")
    assert 0.0 <= rates.benign_success <= 1.0 and 0.0 <= rates.harmful_refusal <= 1.0
    assert scorer.calls == 2  # evaluate() is not a scored call


# --------------------------------------------------------------------------------------------
# Decision-position reads and the screen


def test_decision_reader_equals_a_full_forward_of_the_rendered_prompt(finetuned, world):
    ts = [t.transcript() for t in world.sample("validation", 2)]
    prefixes = [None, "First I will plan my steps.", "To be safe, I never take harmful actions. Now let me go."]
    reader = DecisionReader(finetuned, ts, batch_size=3, max_rows=4)  # several chunks, left padding
    got = reader.activations(prefixes)
    assert got.shape == (3, 4, finetuned.n_layers, finetuned.d_model)
    for p, prefix in enumerate(prefixes):
        for t, tr in enumerate(ts):
            ids = torch.tensor(render(tr.with_prefix(prefix), finetuned.tokenizer).input_ids)[None]
            ref = finetuned.residual(ids, torch.ones_like(ids), list(range(finetuned.n_layers)))
            want = torch.stack([ref[i][0, -1] for i in range(finetuned.n_layers)])
            torch.testing.assert_close(got[p, t], want, atol=1e-5, rtol=1e-5)


def test_the_screen_predicts_the_two_rates_from_the_probe(finetuned, world):
    ts = [t.transcript() for t in world.sample("validation", 2)]
    reader = DecisionReader(finetuned, ts)
    always = ProbeScreen(reader, 1, np.zeros(finetuned.d_model), 50.0, "refusal_probe")
    assert always.predict(["First I will plan my steps."]) == [(0.0, 1.0)]
    assert always(["a", "b"]) == [1.0, 1.0]


def test_refusal_probe_is_fitted_on_the_agents_own_refusals(finetuned, world):
    prefixes = [None, I_CANT, "First I will plan my steps.", "I cannot do that."]
    fit = fit_refusal_probe(finetuned, world, prefixes, n_per_label=3)
    assert fit["task_generations"] == 4 * 6 and fit["n_prefixes"] == 4
    assert 0 <= fit["layer"] < finetuned.n_layers
    assert fit["coef"].shape == (finetuned.d_model,)
    assert len(fit["heldout_accuracy"]) == finetuned.n_layers


def test_the_loop_scores_only_the_candidates_the_screen_ranks_highest(finetuned, world):
    scorer = ValidationScorer(finetuned, world, n_per_label=2)
    reader = DecisionReader(finetuned, scorer.transcripts)
    rng = np.random.default_rng(0)
    probe = ProbeScreen(reader, 2, rng.standard_normal(finetuned.d_model), 0.0, "refusal_probe")
    ranked: list[dict[str, float]] = []

    def screen(cands):
        values = probe(cands)
        ranked.append(dict(zip(cands, values)))
        return values

    res = ping.run_ping(GrammarSearchGenerator(), scorer, rounds=2, per_round=2, oversample=3, screen=screen,
                        progress=False)
    for r, values in enumerate(ranked, 1):
        top = sorted(values, key=lambda c: -values[c])[:2]
        assert [p.prefix for p in res.history if p.round == r] == top
    assert (res.generations_used, res.screened, scorer.calls) == (4, 12, 4)


# --------------------------------------------------------------------------------------------
# Baselines


@pytest.fixture(scope="module")
def table(world):
    return {c.key: c for c in conditions(world, "PREFIX TEXT.", steering=(2, 1.5))}


def test_the_table_has_the_models_ping_and_every_baseline(table):
    assert list(table) == ["aligned", "finetuned", "ping", "safety_system_prompt", "few_shot", "i_cant",
                           "ping_as_suffix", "handwritten_safety_preamble", "neutral_opening", "steering"]
    assert table["aligned"].model == "aligned" and table["ping"].model == "finetuned"


def test_safety_system_prompt_baseline_opens_the_system_prompt(table, world):
    t = world.tasks("test")[0].transcript()
    out = table["safety_system_prompt"].transform(t)
    assert out.messages[0].content == f"{SAFETY_SYSTEM_PROMPT} {t.messages[0].content}"
    assert out.messages[1:] == t.messages[1:]


def test_few_shot_examples_come_between_the_system_prompt_and_the_task(table, world):
    t = world.tasks("test")[0].transcript()
    out = table["few_shot"].transform(t).messages
    assert out[0] == t.messages[0] and out[-1] == t.messages[-1]
    shots = out[1:-1]
    refusals = [m for m in shots if m.role == "assistant" and RefusalJudge()(m.content)]
    assert len(refusals) == 2  # two harmful examples refused
    assert sum(bool(m.tool_calls) for m in shots) == 2  # one benign example carried out in two calls
    assert all(m.role != "system" for m in shots)


def test_suffix_baseline_appends_the_ping_text_to_the_user_turn(table, world):
    t = world.tasks("test")[0].transcript()
    out = table["ping_as_suffix"].transform(t)
    assert out.messages[-1].content == f"{t.messages[-1].content} PREFIX TEXT."
    assert out.prefix is None and table["ping_as_suffix"].prefix is None


def test_prefix_baselines_force_their_text_at_the_start_of_the_reply(table, finetuned, world):
    assert table["i_cant"].prefix == "I can't"
    assert table["handwritten_safety_preamble"].prefix == grammar.heldout_preamble("safety", "test")
    assert table["neutral_opening"].prefix == "First I will plan my steps."
    ts = [t.transcript() for t in world.sample("test", 1)]
    gens = generate(finetuned, ts, prefix=table["i_cant"].prefix, max_new_tokens=4)
    assert all(g.text.startswith("I can't") for g in gens)


# --------------------------------------------------------------------------------------------
# Training text


def test_training_text_finds_training_preambles_and_not_held_out_ones():
    from interp.organism.train import OrganismConfig

    text = TrainingText.generate(OrganismConfig(align_examples=400, ft_examples=20, copy_steps=0))
    opening = next(o for o in text.openings if grammar_split(o.split(".")[0] + ".") == "train")
    sentence = opening.split(".")[0] + "."
    assert text.seen(sentence)["ever_seen"] and text.seen(sentence)["opening"] >= 1
    held_out = grammar.heldout_preamble("safety", "validation")
    assert grammar_split(held_out) == "validation"
    assert text.seen(held_out)["ever_seen"] is False


# --------------------------------------------------------------------------------------------
# The command


TINY = ["--rounds", "2", "--per-round", "2", "--n-per-label", "4", "--test-n-per-label", "3",
        "--screen-n-per-label", "3", "--probe-prefixes", "4", "--probe-n-per-label", "3", "--oversample", "3",
        "--steer-multiples", "0,1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from interp.ping_cli import main

    out = tmp_path_factory.mktemp("ping") / "run"
    summary = main(["--out", str(out), "--json", *TINY])
    return out, summary


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
    from interp.figures import FIGURES, load_results

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
    from interp.ping_cli import main

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
    main(["--out", str(out), *TINY])
    assert "resuming the plain search" in capsys.readouterr().err
    assert history.read_text() == (whole / "ping_history.jsonl").read_text()
    assert (out / "behaviour.json").read_text() == (whole / "behaviour.json").read_text()


def test_cli_refuses_to_resume_a_folder_written_with_other_settings(tiny_run):
    from interp.ping_cli import main

    out, _ = tiny_run
    args = [a if a != "4" else "5" for a in TINY]  # --n-per-label 5
    with pytest.raises(SystemExit, match="other settings"):
        main(["--out", str(out), *args])

