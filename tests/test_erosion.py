"""Cross-domain erosion: the narrow training data, and the study's resumable record."""

from __future__ import annotations

import pytest

from interp.organism import World
from interp.organism import erosion


def test_narrow_training_data_holds_only_its_domains_benign_training_tasks():
    world = World(0)
    for domain in ("code", "web"):
        data = erosion.domain_data(world, domain, 40, seed=0)
        assert {t.metadata["domain"] for t in data} == {domain}
        assert not any(t.labels["harmful"] for t in data)
    both = erosion.domain_data(world, "both", 200, seed=0)
    assert {t.metadata["domain"] for t in both} == {"code", "web"}


def test_domain_tasks_are_balanced_and_from_the_split():
    tasks = erosion.domain_tasks(World(0), "test", "web", 7, seed=0)
    assert [t.harmful for t in tasks].count(True) == 7 == [t.harmful for t in tasks].count(False)
    assert {t.domain for t in tasks} == {"web"} and {t.split for t in tasks} == {"test"}


def test_the_study_keeps_finished_runs_and_refuses_other_settings(tmp_path, monkeypatch):
    calls = []

    def fake(seed, trained_on, **kw):
        calls.append((seed, trained_on))
        r = {"harmful_refusal": {"value": 0.5}, "benign_success": {"value": 1.0}}
        return {"seed": seed, "trained_on": trained_on, "test": {"code": r, "web": r}, "seconds": 0.0}

    monkeypatch.setattr(erosion, "run_one", fake)
    erosion.run([0], tmp_path, trained_on=("code",))
    erosion.run([0, 1], tmp_path, trained_on=("code", "web"))
    assert calls == [(0, "code"), (0, "web"), (1, "code"), (1, "web")]
    with pytest.raises(ValueError, match="other settings"):
        erosion.run([0], tmp_path, probe_step=7)


def test_internals_of_a_model_against_itself_transfer_exactly_and_reuse_given_activations():
    from interp.models import load_model
    from interp.organism import checkpoint_path

    world = World(0)
    model = load_model(str(checkpoint_path("organism")))
    got = erosion.internals(model, model, world, "web", 8, seed=0)
    assert got["auroc_transfer"] == got["auroc_aligned"] == got["auroc_finetuned"]
    assert got["direction_cosine"] == pytest.approx([1.0] * len(got["layers"]), abs=1e-5)
    train = [t.transcript() for t in erosion.domain_tasks(world, "train", "web", 8, 0)]
    test = [t.transcript() for t in erosion.domain_tasks(world, "test", "web", 8, 0)]
    given = (erosion.decision_acts(model, train), erosion.decision_acts(model, test))
    assert erosion.internals(None, model, world, "web", 8, seed=0, aligned_acts=given) == got


def test_the_smollm2_study_keeps_finished_runs_and_reads_the_aligned_model_once_per_seed(tmp_path, monkeypatch):
    from interp.smollm2 import erosion as smollm2_erosion

    refs, runs = [], []

    def reference(world, n_per_label, seed):
        refs.append(seed)
        return {"code": {}, "web": {}}, {"code": (), "web": ()}

    def fake(recipe, seed, domain, out, aligned_acts, **kw):
        runs.append((seed, domain))
        r = {"harmful_refusal": {"value": 0.5}, "benign_success": {"value": 1.0}}
        return {"seed": seed, "trained_on": domain, "test": {"code": r, "web": r}, "seconds": 0.0}

    monkeypatch.setattr(smollm2_erosion, "aligned_reference", reference)
    monkeypatch.setattr(smollm2_erosion, "run_one", fake)
    smollm2_erosion.run([0], tmp_path, ("code",))
    smollm2_erosion.run([0, 1], tmp_path)
    assert runs == [(0, "code"), (0, "web"), (1, "code"), (1, "web")] and refs == [0, 0, 1]
    assert smollm2_erosion.run([0, 1], tmp_path)["runs"] and refs == [0, 0, 1]  # nothing left to do
    with pytest.raises(ValueError, match="other settings"):
        smollm2_erosion.run([0], tmp_path, n_per_label=7)
