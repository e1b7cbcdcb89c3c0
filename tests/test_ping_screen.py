"""Scoring a prefix on a task set and screening candidates without generating, on the shipped
organism (interp.ping.scoring, interp.ping.screen, interp.cache.cache_prefixed)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tasks

from interp.cache import cache_prefixed
from interp.organism import prefixes
from interp.organism.prefixes import organism_lexicon
from interp.ping import I_CANT, PhraseSearchGenerator, ProbeScreen, Scorer, fit_refusal_probe, run_ping
from interp.transcripts import render

# --------------------------------------------------------------------------------------------
# The scorer


def test_the_organism_subject_scores_on_the_validation_split_only(finetuned, world):
    ts = prefixes.subject().tasks("validation", 3, 0)
    scorer = Scorer(finetuned, world, ts)
    ids = [t.id for t in scorer.transcripts]
    assert len(ids) == 6 and all(i.startswith("vali-") for i in ids)
    assert [t.labels["harmful"] for t in scorer.transcripts] == [True] * 3 + [False] * 3
    assert {t.labels["split"] for t in scorer.transcripts} == {"validation"}
    ev = scorer.evaluate(None)
    assert [o.task_id for o in ev.outcomes] == ids


def test_scorer_returns_the_two_rates_of_the_forced_prefix(finetuned, world):
    scorer = Scorer(finetuned, world, tasks(world, "validation", 4))
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


def test_prefixed_reads_equal_a_full_forward_of_the_rendered_prompt(finetuned, world):
    ts = tasks(world, "validation", 2)
    prefixes = [None, "First I will plan my steps.", "To be safe, I never take harmful actions. Now let me go."]
    got = cache_prefixed(finetuned, ts, prefixes, batch_size=3, max_rows=4)  # several chunks, left padding
    assert got.shape == (3, 4, finetuned.n_layers, finetuned.d_model)
    for p, prefix in enumerate(prefixes):
        for t, tr in enumerate(ts):
            ids = torch.tensor(render(tr.with_prefix(prefix), finetuned.tokenizer).input_ids)[None]
            ref = finetuned.residual(ids, torch.ones_like(ids), list(range(finetuned.n_layers)))
            want = torch.stack([ref[i][0, -1] for i in range(finetuned.n_layers)])
            torch.testing.assert_close(got[p, t], want, atol=1e-5, rtol=1e-5)


def test_the_screen_predicts_the_two_rates_from_the_probe(finetuned, world):
    ts = tasks(world, "validation", 2)
    always = ProbeScreen(finetuned, tuple(ts), 1, np.zeros(finetuned.d_model), 50.0, "refusal_probe")
    assert always.predict(["First I will plan my steps."]) == [(0.0, 1.0)]
    assert always(["a", "b"]) == [1.0, 1.0]


def test_refusal_probe_is_fitted_on_the_agents_own_refusals(finetuned, world):
    prefixes = [None, I_CANT, "First I will plan my steps.", "I cannot do that."]
    fit = fit_refusal_probe(finetuned, world, tasks(world, "train", 3), prefixes)
    assert fit["task_generations"] == 4 * 6 and fit["n_prefixes"] == 4
    assert 0 <= fit["layer"] < finetuned.n_layers
    assert fit["coef"].shape == (finetuned.d_model,)
    assert len(fit["heldout_accuracy"]) == finetuned.n_layers


def test_the_loop_scores_only_the_candidates_the_screen_ranks_highest(finetuned, world):
    scorer = Scorer(finetuned, world, tasks(world, "validation", 2))
    rng = np.random.default_rng(0)
    probe = ProbeScreen(finetuned, tuple(scorer.transcripts), 2, rng.standard_normal(finetuned.d_model), 0.0,
                        "refusal_probe")
    ranked: list[dict[str, float]] = []

    def screen(cands):
        values = probe(cands)
        ranked.append(dict(zip(cands, values)))
        return values

    res = run_ping(PhraseSearchGenerator(organism_lexicon()), scorer, rounds=2, per_round=2, oversample=3, screen=screen,
                        progress=False)
    for r, values in enumerate(ranked, 1):
        top = sorted(values, key=lambda c: -values[c])[:2]
        assert [p.prefix for p in res.history if p.round == r] == top
    assert (res.generations_used, res.screened, scorer.calls) == (4, 12, 4)
