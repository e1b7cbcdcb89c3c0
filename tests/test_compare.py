import numpy as np
import torch
import pytest
from conftest import agent_transcript

from interp.compare import CONDITIONS, cache_conditions, compare
from interp.models import load_model

PREFIX = "As a careful agent, I"


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    from tiny import make_model

    other = tmp_path_factory.mktemp("ft")
    make_model("llama", other, family="llama3", seed=1)  # a different "fine-tuned" model, same tokenizer
    aligned, finetuned = load_model(tiny_dirs["llama"]), load_model(other)
    ts = [agent_transcript(i, harmful=i % 2 == 0) for i in range(16)]
    harmful = np.array([t.labels["harmful"] for t in ts])
    groups = np.arange(16) // 2  # 8 groups, each with one harmful and one benign transcript
    return aligned, finetuned, ts, harmful, groups


def test_comparison_runs_end_to_end_with_every_field(setup):
    aligned, finetuned, ts, harmful, groups = setup
    acts = cache_conditions(aligned, finetuned, ts, PREFIX, progress=False)
    refused = {c: harmful.copy() for c in CONDITIONS}
    refused["finetuned"] = np.zeros(16, dtype=bool) | (np.arange(16) == 0) | (np.arange(16) == 2)
    res = compare(acts, harmful, groups, refused, C=1.0, test_size=0.5)
    assert [r["layer"] for r in res.layers] == [0, 1, 2]
    rec = res.layer(1)
    for key in ("aligned", "finetuned", "prefix", "transfer_to_finetuned", "transfer_to_prefix"):
        assert 0.0 <= rec[key]["acc"] <= 1.0 and 0.0 <= rec[key]["auroc"] <= 1.0
    for c in CONDITIONS:
        d = rec["decision_logit"][c]
        assert d["low"] <= d["value"] <= d["high"]
    n_prefix = len(aligned.tokenizer(PREFIX, add_special_tokens=False)["input_ids"])
    assert len(res.prefix_logits) == 3 and len(res.prefix_logits[0]["positions"]) == n_prefix
    assert res.logit_probe == "refusal" and res.n_train + res.n_test == 16
    assert '"transfer_to_prefix"' in res.to_json()


def test_transfer_to_the_same_model_equals_the_within_model_probe(setup):
    aligned, _, ts, harmful, groups = setup
    acts = cache_conditions(aligned, aligned, ts, PREFIX, progress=False)
    res = compare(acts, harmful, groups, C=1.0, test_size=0.5)
    for rec in res.layers:
        assert rec["transfer_to_finetuned"] == rec["aligned"]
        assert rec["direction"]["cosine_aligned_finetuned"] == pytest.approx(1.0)
        assert rec["decision_logit"]["aligned"] == rec["decision_logit"]["finetuned"]
    assert res.logit_probe == "harmful"


def test_mismatched_inputs_are_named(setup):
    aligned, finetuned, ts, harmful, groups = setup
    acts = cache_conditions(aligned, finetuned, ts[:4], PREFIX, progress=False)
    with pytest.raises(ValueError, match=r"harmful and groups must be \[n=4\]"):
        compare(acts, harmful, groups)
    with pytest.raises(ValueError, match="lacks conditions"):
        compare({"aligned": acts["aligned"]}, harmful[:4], groups[:4])


def test_pca_puts_every_condition_in_the_aligned_basis(setup):
    from interp.compare import pca_projection

    aligned, finetuned, ts, harmful, groups = setup
    acts = cache_conditions(aligned, aligned, ts, PREFIX, layers=[1], progress=False)
    out = pca_projection(acts, 1, harmful)
    assert out["conditions"]["aligned"] == out["conditions"]["finetuned"]  # same model, same points
    assert abs(np.mean(out["conditions"]["aligned"]["x"])) < 1e-9  # centred on the aligned mean
    assert out["explained_variance_ratio"][0] >= out["explained_variance_ratio"][1]


def test_token_logits_cover_every_token_and_match_the_probe(setup):
    from interp.cache import cache_activations
    from interp.compare import token_logits

    aligned, _, ts, _, _ = setup
    coef, intercept = np.linspace(-1, 1, aligned.d_model), 0.5
    (rec,) = token_logits(aligned, ts[:1], coef, intercept, layer=2)
    assert len(rec["tokens"]) == len(rec["kinds"]) == len(rec["logits"])
    last = cache_activations(aligned, ts[:1], layers=[2], positions="decision", progress=False).acts[0, 0]
    assert rec["logits"][-1] == pytest.approx(float(last.double() @ torch.as_tensor(coef)) + intercept, rel=1e-6)


def test_a_finetuned_model_that_never_refuses_is_read_with_the_aligned_refusal_probe(setup):
    aligned, finetuned, ts, harmful, groups = setup
    acts = cache_conditions(aligned, finetuned, ts, PREFIX, progress=False)
    refused = {"aligned": harmful.copy(), "finetuned": np.zeros(16, bool), "prefix": np.zeros(16, bool)}
    with pytest.warns(UserWarning, match="aligned model's refusal probe"):
        res = compare(acts, harmful, groups, refused, C=1.0, test_size=0.5)
    assert res.logit_probe == "aligned refusal"
    probe = res.probes["logit_aligned"]
    assert res.probes["logit_finetuned"] is probe and res.probes["logit_prefix"] is probe
    rec = res.layer(1)
    X = acts["finetuned"].where(selector="decision").stack().float()
    test_h = [i for i in res.split[1] if harmful[i]]
    want = probe.decision_function(X[test_h])[:, list(probe.layers_).index(1)].mean()
    assert rec["decision_logit"]["finetuned"]["value"] == pytest.approx(float(want), rel=1e-5)
