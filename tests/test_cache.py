"""Cached activations against ground truth: a plain Hugging Face forward of the same inputs."""

import numpy as np
import pytest
import torch
from conftest import ARCHS, agent_transcript, assert_within_row_norm
from transformers import AutoModelForCausalLM

from interp import positions as P
from interp.cache import cache_activations, pad_batch, render_for
from interp.models import load_model, position_ids_from_mask
from interp.positions import PositionError, decision, every
from interp.transcripts import TranscriptError

BACKENDS = ("hf", "bridge", "nnsight")
_models = {}


def model_for(tiny_dirs, arch, backend):
    key = (arch, backend)
    if key not in _models:
        _models[key] = load_model(tiny_dirs[arch], backend=backend)
    return _models[key]


def reference_residuals(path, rendered):
    """Every layer's resid_pre / resid_mid / resid_post for each transcript alone (no padding),
    from a separately loaded plain HF model: hidden_states for resid_pre, the block's own output
    for resid_post (HF's last hidden_states entry is after the final norm), and resid_pre plus the
    attention output for resid_mid."""
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    blocks = ref.model.layers if hasattr(ref, "model") else ref.transformer.h
    out = []
    for r in rendered:
        post, attn = {}, {}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: post.__setitem__(i, o[0] if isinstance(o, tuple) else o))
                 for i, b in enumerate(blocks)]
        hooks += [(b.self_attn if hasattr(b, "self_attn") else b.attn).register_forward_hook(
            lambda m, a, o, i=i: attn.__setitem__(i, o[0])) for i, b in enumerate(blocks)]
        with torch.no_grad():
            hs = ref(input_ids=torch.as_tensor(r.input_ids)[None], output_hidden_states=True).hidden_states
        for h in hooks:
            h.remove()
        n = len(blocks)
        out.append({"resid_pre": torch.stack([hs[i][0] for i in range(n)], 1),
                    "resid_post": torch.stack([post[i][0] for i in range(n)], 1),
                    "resid_mid": torch.stack([hs[i][0] + attn[i][0] for i in range(n)], 1)})  # [pos, L, d]
    return out


@pytest.fixture(scope="module")
def refs(tiny_dirs):
    ts = [agent_transcript(i, prefix="As a careful agent, I" if i % 2 else None) for i in range(5)]
    out = {}
    for arch in ARCHS:
        rendered = render_for(model_for(tiny_dirs, arch, "hf"), ts)
        out[arch] = (rendered, reference_residuals(tiny_dirs[arch], rendered))
    return out


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_activations_equal_a_plain_forward(tiny_dirs, refs, arch, backend, site):
    model = model_for(tiny_dirs, arch, backend)
    rendered, ref = refs[arch]
    sel = P.decision() + P.every("user") + P.last("tool_call")
    acts = cache_activations(model, rendered, layers="all", site=site, positions=sel, batch_size=3, progress=False)
    for row in range(len(acts)):
        t, p = acts.rows["transcript"][row], acts.rows["position"][row]
        assert_within_row_norm(acts.acts[row], ref[t][site][p])


def test_the_last_block_is_checked_against_its_own_output_not_the_final_norm(tiny_dirs, refs):
    model = model_for(tiny_dirs, "llama", "hf")
    rendered, ref = refs["llama"]
    acts = cache_activations(model, rendered[:1], layers=[-1], positions="decision", progress=False)
    hs_last = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])(
        input_ids=torch.as_tensor(rendered[0].input_ids)[None], output_hidden_states=True).hidden_states[-1]
    p = acts.rows["position"][0]
    assert_within_row_norm(acts.acts[0, 0], ref[0]["resid_post"][p, -1])
    assert not torch.allclose(acts.acts[0, 0], hs_last[0, p], atol=1e-3)  # that entry is post-norm


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_transcript_batched_with_others_gives_what_it_gives_alone(tiny_dirs, backend, padding_side):
    model = model_for(tiny_dirs, "qwen2", backend)
    ts = [agent_transcript(i, prefix="As a careful agent, I" if i % 2 else None) for i in range(6)]
    sel = "decision+mean:user+every:tool_result"
    together = cache_activations(model, ts, positions=sel, batch_size=6, padding_side=padding_side, progress=False)
    lengths = {len(r) for r in render_for(model, ts)}
    assert len(lengths) > 2  # really padded
    for i, t in enumerate(ts):
        alone = cache_activations(model, [t], positions=sel, batch_size=1, progress=False)
        assert_within_row_norm(together.for_transcript(i), alone.acts)


def test_segment_mean_is_the_mean_of_its_tokens(tiny_dirs):
    model = model_for(tiny_dirs, "llama", "hf")
    t = agent_transcript(3)
    every = cache_activations(model, [t], positions="every:user", progress=False)
    mean = cache_activations(model, [t], positions="mean:user", progress=False)
    torch.testing.assert_close(mean.acts[0], every.acts.mean(0), atol=1e-6, rtol=0)
    assert mean.rows["n_positions"][0] == len(every)


def test_rows_record_where_they_came_from(tiny_dirs):
    model = model_for(tiny_dirs, "llama", "hf")
    ts = [agent_transcript(i, prefix="As a careful agent, I", harmful=i == 0) for i in range(2)]
    acts = cache_activations(model, ts, layers=[0, 2], positions="every:prefix+decision", progress=False)
    rendered = render_for(model, ts)
    n_prefix = len(rendered[0].positions("prefix"))
    assert len(acts) == 2 * (n_prefix + 1)
    assert acts.selectors[:n_prefix + 1] == (every("prefix"),) * n_prefix + (decision(),)
    assert acts.rows["position"][n_prefix] == len(rendered[0]) - 1  # decision = last prefix token
    assert acts.hook_names == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert acts.labels("harmful", per="transcript").tolist() == [True, False]
    dec = acts.where(selector=decision())
    assert dec.stack().shape == (2, 2, model.d_model)
    rec = acts.records()[0]
    assert rec["transcript_id"] == "agent-0" and rec["kind"] == "prefix" and rec["labels"] == {"harmful": True}


def test_pad_batch_offsets_follow_the_padding_side():
    class R:
        def __init__(self, n):
            self.input_ids = np.arange(1, n + 1)

        def __len__(self):
            return len(self.input_ids)

    ids, mask, off = pad_batch([R(2), R(4)], pad_id=0, side="left")
    assert ids.tolist() == [[0, 0, 1, 2], [1, 2, 3, 4]] and off.tolist() == [2, 0]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    ids, mask, off = pad_batch([R(2), R(4)], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]] and off.tolist() == [0, 0]


# ---------------------------------------------------------------------------- bad input

def test_layer_out_of_range_is_refused(tiny_dirs):
    model = model_for(tiny_dirs, "llama", "hf")
    with pytest.raises(ValueError, match=r"layer 7 is out of range: .* has 3 layers \(0\.\.2\)"):
        cache_activations(model, [agent_transcript(0)], layers=[0, 7], progress=False)


def test_unknown_site_is_refused(tiny_dirs):
    model = model_for(tiny_dirs, "llama", "hf")
    with pytest.raises(ValueError, match="unknown site 'resid_final'"):
        cache_activations(model, [agent_transcript(0)], site="resid_final", progress=False)


def test_empty_transcript_list_is_refused(tiny_dirs, tmp_path):
    model = model_for(tiny_dirs, "llama", "hf")
    with pytest.raises(ValueError, match="no transcripts given"):
        cache_activations(model, [], store=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_selector_matching_no_token_is_refused_before_anything_is_written(tiny_dirs, tmp_path):
    model = model_for(tiny_dirs, "llama", "hf")
    ts = [agent_transcript(0, prefix="Sure"), agent_transcript(1)]
    with pytest.raises(PositionError, match="'every:prefix' matches no token in transcript 'agent-1'"):
        cache_activations(model, ts, positions="every:prefix", store=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_transcript_longer_than_the_context_raises_or_truncates_when_asked(tiny_dirs):
    model = load_model(tiny_dirs["gpt2"], backend="hf")
    model.hf_model.config.n_positions = 40  # pretend the context is short
    t = agent_transcript(0, prefix="As a careful agent, I")
    with pytest.raises(TranscriptError, match="longer than the context of 40"):
        cache_activations(model, [t], progress=False)
    acts = cache_activations(model, [t], truncate=True, positions="decision", progress=False)
    assert acts.transcripts[0]["truncated"] > 0 and acts.rows["position"][0] == 39
