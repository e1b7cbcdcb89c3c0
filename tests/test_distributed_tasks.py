"""The distributed-harm tasks: ground truth of where each piece sits, checked against renderings.

The oracle renders a task and its twin through the organism's chat template and compares the
decoded text of every segment; it never reads ``locations``, which the tasks' code writes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from handbuilt import handbuilt_model, only_in

from interp.attribution import DirectionProjection, planted_of, recovery, segment_interactions
from interp.models import load_model
from interp.organism import checkpoint_path
from interp.organism.distributed import KINDS, PIECE_KIND, SCHEMES, DistributedEnv, cases, evaluation_set
from interp.transcripts import render

TASKS = evaluation_set("test", 2)


@pytest.fixture(scope="module")
def organism():
    return load_model(str(checkpoint_path("organism")))


def segment_texts(t, tokenizer) -> dict[str, str]:
    r = render(t.transcript(), tokenizer)
    ids = [int(i) for i in r.input_ids]
    return {s.name: tokenizer.decode(ids[s.start:s.end]) for s in r.segments()}


def differing(a, b, tokenizer) -> set[str]:
    ta, tb = segment_texts(a, tokenizer), segment_texts(b, tokenizer)
    assert ta.keys() == tb.keys()
    return {k for k in ta if ta[k] != tb[k]}


def test_every_scheme_and_kind_has_a_harmful_task_its_twins_and_a_null_twin():
    got = {(t.case.scheme, t.case.kind, t.role) for t in TASKS}
    for s in SCHEMES:
        assert {(s, "pair", r) for r in ("harmful", "twin:act", "twin:target", "null")} <= got
        assert {(s, "triple", r) for r in ("harmful", "twin:act", "twin:target", "twin:policy", "null")} <= got
    assert all(t.harmful == (t.role == "harmful") for t in TASKS)
    assert {k for _, k, _ in got} == set(KINDS)


def test_a_twin_differs_from_its_harmful_task_in_exactly_the_segment_its_piece_is_said_to_sit_in(organism):
    for t in (t for t in TASKS if t.harmful):
        for piece in t.case.pieces:
            changed = differing(t, t.twin(piece), organism.tokenizer)
            assert changed == {t.locations[piece]}, (t.id, piece, changed)
            assert changed.pop().startswith(PIECE_KIND[piece])
        assert differing(t, t.null(), organism.tokenizer) == set(t.locations.values())


def test_test_targets_and_phrasings_are_unseen_in_training():
    train, test = cases("train", 30), cases("test", 30)
    assert not {c.target[0] for c in train} & {c.target[0] for c in test}
    assert not {c.phrasing for c in train} & {c.phrasing for c in test}


def test_the_environment_accepts_exactly_the_effectful_call():
    env = DistributedEnv(TASKS)
    for t in TASKS[:10]:
        call, _ = t.effect()
        assert env.first_step_ok(t.id, [call]) and env.succeeded(t.id, [call])
        assert not env.first_step_ok(t.id, [t.probes()[0][0]])
    with pytest.raises(KeyError, match="no distributed task"):
        env.observe("nope", call)


def test_exact_interactions_recover_the_planted_pieces_of_a_model_that_ands_them(organism):
    """A hand-built model that reads the act's and the target's own tokens and ANDs their
    presence: the exact method ranks the task's planted pair first on every task."""
    harmful = [t for t in TASKS if t.harmful and t.case.kind == "pair"][:3]
    results = []
    for t in harmful:
        tr = t.transcript()
        r = render(tr, organism.tokenizer)
        model = handbuilt_model(organism.tokenizer, only_in(r, [t.locations["act"], t.locations["target"]]))
        d = torch.zeros(model.d_model)
        d[-1] = 1.0
        results += segment_interactions(model, [tr], DirectionProjection(d, layer=0),
                                        baseline=torch.zeros(model.n_layers, model.d_model), merge=("template",),
                                        layers=[0], progress=False)
    rec = recovery(results, planted_of(results, {t.id: t.locations for t in harmful}))
    assert rec.top1[0]["value"] == 1.0 and rec.mean_rank == (1.0,)
    assert np.all([x.term(*t.locations.values())[0] == 1.0 for x, t in zip(results, harmful)])
