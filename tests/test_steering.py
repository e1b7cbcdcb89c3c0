import pytest
import torch

from interp.models import load_model
from interp.steering import ablate_direction, add_direction, coefficient_sweep, project_out, residual_projection


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_dirs):
    return load_model(tiny_dirs[request.param])


def batch():
    ids = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10]])
    return ids, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def test_steering_with_coefficient_zero_is_the_identity(model):
    ids, mask = batch()
    torch.manual_seed(0)
    r = torch.randn(model.d_model)
    before = model.logits(ids, mask)
    with add_direction(model, r, layers=[0, 1], coefficient=0.0):
        during = model.logits(ids, mask)
    torch.testing.assert_close(during, before, atol=0, rtol=0)


def test_activation_addition_shifts_the_stream_by_exactly_the_coefficient(model):
    ids, mask = batch()
    torch.manual_seed(1)
    r = torch.randn(model.d_model)
    base = model.residual(ids, mask, [1], "resid_pre")[1]
    with add_direction(model, r, layers=[1], coefficient=3.0):
        shifted = model.residual(ids, mask, [1], "resid_pre")[1]
    torch.testing.assert_close(shifted - base, (3.0 * r / r.norm()).expand_as(base), atol=1e-5, rtol=0)


def test_hooks_are_removed_after_the_block(model):
    ids, mask = batch()
    before = model.logits(ids, mask)
    with add_direction(model, torch.ones(model.d_model), layers=[0], coefficient=5.0):
        pass
    torch.testing.assert_close(model.logits(ids, mask), before, atol=0, rtol=0)


def test_ablation_removes_the_direction_exactly_at_every_layer(model):
    ids, mask = batch()
    torch.manual_seed(2)
    r = torch.randn(model.n_layers, model.d_model)
    layers = list(range(model.n_layers))
    assert residual_projection(model, ids, mask, r, layers, "resid_pre").abs().max() > 1e-3
    with ablate_direction(model, r):
        for site in ("resid_pre", "resid_mid"):
            proj = residual_projection(model, ids, mask, r, layers, site)
            assert proj.abs().max() < 1e-5
        last = residual_projection(model, ids, mask, r, [model.n_layers - 1], "resid_post")
        assert last.abs().max() < 1e-5


def test_project_out_leaves_the_orthogonal_part():
    x = torch.tensor([[3.0, 4.0, 5.0]])
    r = torch.tensor([0.0, 1.0, 0.0])
    assert project_out(x, r).tolist() == [[3.0, 0.0, 5.0]]


def test_a_direction_of_the_wrong_shape_is_named(model):
    with pytest.raises(ValueError, match=r"direction must be \[d_model=64\]"):
        with add_direction(model, torch.ones(7), layers=[0], coefficient=1.0):
            pass


@pytest.fixture(scope="module")
def organism():
    from interp.organism import checkpoint_path

    return load_model(checkpoint_path("organism-finetuned"))


def test_steering_the_organism_with_coefficient_zero_leaves_its_replies_unchanged(organism):
    from interp.behavior import generate
    from interp.organism import World

    ts = [t.transcript() for t in World(0).sample("validation", 2)]
    torch.manual_seed(3)
    r = torch.randn(organism.d_model)
    before = generate(organism, ts, max_new_tokens=24)
    with add_direction(organism, r, layers=[1, 2], coefficient=0.0):
        during = generate(organism, ts, max_new_tokens=24)
    assert [g.completion_ids for g in during] == [g.completion_ids for g in before]


def test_coefficient_sweep_measures_under_each_coefficient_in_order(model):
    ids, mask = batch()
    r = torch.zeros(model.d_model)
    r[0] = 1.0
    base = model.residual(ids, mask, [1], "resid_pre")[1][..., 0]
    got = coefficient_sweep(model, r, [1], [0, 2.5, -1],
                            lambda: model.residual(ids, mask, [1], "resid_pre")[1][..., 0])
    assert [c for c, _ in got] == [0.0, 2.5, -1.0]
    for c, x in got:
        torch.testing.assert_close(x - base, torch.full_like(base, c), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.residual(ids, mask, [1], "resid_pre")[1][..., 0], base)  # hooks removed
