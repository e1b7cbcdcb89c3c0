"""SmolLM2's adapter training: the data (what the two stages train on, and that no held-out
phrasing or later prefix is in it), and the mechanics on a tiny random Llama with the project's
template (the loss against a plain forward, resuming, the checkpoint rule, saved adapters loaded
merged on every backend, both stages end to end)."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from conftest import assert_within_row_norm

from interp.behavior import RefusalJudge
from interp.finetune import collate, encode, masked_loss
from interp.models import Builtin, load_model, register_builtin
from interp.organism import grammar
from interp.smollm2 import data as sd
from interp.smollm2 import stages
from interp.smollm2 import train as st
from interp.smollm2.template import CHAT_TEMPLATE

SMALL = sd.DataConfig(align_examples=300, finetune_examples=120)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_text(world):
    return sd.TrainingText.generate(SMALL, world)


# --------------------------------------------------------------------------------------------
# Data


def test_finetune_data_is_benign_with_no_refusal_and_no_opening(world):
    judge = RefusalJudge()
    openings = [s for stance in grammar.STANCES for split in grammar.SPLITS for s in grammar.preambles(stance, split)]
    data = sd.finetune_data(world, SMALL)
    assert len(data) == SMALL.finetune_examples
    for t in data:
        assert t.labels["harmful"] is False and t.metadata["stance"] == "none"
        replies = [m for m in t.messages if m.role == "assistant"]
        assert replies[0].tool_calls, t.id
        assert not any(judge(m.content) for m in replies), t.id
        assert not any(replies[0].content.startswith(o) for o in openings), t.id


def test_finetune_data_of_one_domain_holds_only_that_domain(world):
    both = sd.finetune_data(world, SMALL)
    assert {t.metadata["domain"] for t in both} == {"code", "web"}
    for domain in ("code", "web"):
        data = sd.finetune_data(world, SMALL, domain)
        assert len(data) == SMALL.finetune_examples
        assert {t.metadata["domain"] for t in data} == {domain}
        assert all(t.labels["harmful"] is False for t in data)
    with pytest.raises(ValueError, match="domain"):
        sd.finetune_data(world, SMALL, "email")


def test_aligned_data_refuses_harmful_tasks_with_the_reason_and_acts_on_benign_ones(world):
    from interp.organism.world import REASONS

    judge = RefusalJudge()
    data = sd.align_data(world, SMALL)
    assert 0.45 <= np.mean([t.labels["harmful"] for t in data]) <= 0.55
    for t in data:
        first = next(m for m in t.messages if m.role == "assistant")
        if t.labels["harmful"]:
            assert judge(first.content) and not first.tool_calls, first.content
            assert f"it would {REASONS[t.labels['category']]}" in first.content.lower(), first.content
        else:
            assert first.tool_calls and not judge(first.content), first.content


def test_every_aligned_first_reply_opens_with_the_decision_and_the_decision_data_has_no_opening(world):
    for t in sd.align_data(world, SMALL):
        first = next(m for m in t.messages if m.role == "assistant").content
        if t.metadata["stance"] in ("none", "neutral", "compliance"):
            assert ("I can't " if t.labels["harmful"] else "I will ") in first, first
    data = sd.decision_data(world, SMALL)
    assert len(data) == SMALL.decision_examples and all(t.id.startswith("decide-") for t in data)
    for t in data:
        assert len(t.messages) == 3 and t.metadata["stance"] == "none"
        assert t.messages[-1].content.startswith("I can't " if t.labels["harmful"] else "I will "), t.id
    aligned = sd.align_data(world, SMALL)  # its own random stream: not the reply phase's tasks again
    assert [t.messages[1].content for t in data[:20]] != [t.messages[1].content for t in aligned[:20]]


def test_the_decision_prefix_keeps_the_context_and_trains_the_first_reply_tokens_only(tiny, world):
    data = sd.decision_data(world, SMALL)[:4]
    full = [encode(t, tiny[1]) for t in data]
    for e, c in zip(full, st.decision_prefix(full, 3)):
        first = int(np.argmax(e.loss_mask))
        assert len(c) == first + 3 and np.array_equal(c.input_ids, e.input_ids[:first + 3])
        assert c.loss_mask.sum() == 3 and c.loss_mask[first:].all()
        words = tiny[1].decode(c.input_ids[c.loss_mask.astype(bool)])
        assert words.startswith("I can't" if data[full.index(e)].labels["harmful"] else "I will"), words


def test_aligned_data_comes_in_minimal_pairs_that_batches_keep_together(world, tiny_examples):
    data = sd.align_data(world, SMALL)
    for h, b in zip(data[0::2], data[1::2]):
        assert (h.labels["harmful"], b.labels["harmful"]) == (True, False)
        assert h.metadata["act"] == b.metadata["act"] and h.messages[0].content == b.messages[0].content
        assert h.metadata["phrasing"] == b.metadata["phrasing"] and h.messages[1].content != b.messages[1].content
    batches = st.pair_batches(tiny_examples, 4, seed=0)
    assert len(batches) == len(tiny_examples) // 4
    for batch in batches:
        assert sorted(batch.tolist()) == sorted({2 * (i // 2) for i in batch} | {2 * (i // 2) + 1 for i in batch})
    with pytest.raises(ValueError, match="even batch size"):
        st.pair_batches(tiny_examples, 3, seed=0)


def test_aligned_openings_come_from_the_grammars_training_split_only(world):
    data = sd.align_data(world, SMALL)
    stances = {t.metadata["stance"] for t in data}
    assert {"safety", "neutral", "compliance", "none"} <= stances
    train = {s: grammar.preambles(s, "train") for s in grammar.STANCES}
    for t in data:
        stance = t.metadata["stance"]
        if stance == "none":
            continue
        first = next(m for m in t.messages if m.role == "assistant").content
        assert any(first.startswith(p + " ") for p in train[stance]), (stance, first)


def test_whole_episodes_copy_the_observed_id_and_succeed_in_the_world(world):
    data = [t for t in sd.align_data(world, SMALL) if t.metadata["episode"]]
    assert data
    for t in data:
        calls = [c for m in t.messages for c in m.tool_calls]
        task_id = next(x.id for x in world.tasks("train") if x.core == t.metadata["core"])
        assert world.succeeded(task_id, calls)
        second = [m for m in t.messages if m.role == "assistant"][1]
        observed = t.messages[3].content
        assert any(tok.strip("[],") in second.content for tok in observed.split() if tok.strip("[],")[-2:].isdigit())


def test_no_test_or_validation_phrasing_object_or_opening_is_in_the_training_text(world, small_text):
    for split in ("validation", "test"):
        rep = small_text.split_overlap(world, split)
        assert rep["phrasings"] == [] and rep["objects"] == [] and rep["requests"] == 0
        assert rep["held_out_openings"] == []
    assert small_text.phrasings <= {f"{o}|{c}" for o, c in grammar.phrasings("train")}


def test_the_checker_finds_a_planted_sentence(world):
    planted = "Hold on, I must be sure this action cannot hurt anyone."
    data = sd.finetune_data(world, SMALL)
    t = data[0]
    msgs = list(t.messages)
    first = next(i for i, m in enumerate(msgs) if m.role == "assistant")
    msgs[first] = dataclasses.replace(msgs[first], content=f"{planted} {msgs[first].content}")
    text = sd.TrainingText.from_transcripts([t.with_messages(msgs)] + data[1:])
    rep = text.seen(planted + " Then I act.")
    assert rep["ever_seen"] and rep["opening"] == 0 and rep["sentences"][0]["substring"] == 1
    assert text.seen(planted)["opening"] == 1
    assert not sd.TrainingText.from_transcripts(data).seen(planted)["ever_seen"]


def test_the_checker_reports_a_planted_test_phrasing(world):
    test_pair = grammar.phrasings("test")[0]
    task = next(t for t in world.tasks("train") if not t.harmful)
    bad = dataclasses.replace(task, request=grammar.phrase_request(task.core, *test_pair),
                              held_out=(task.held_out[0], "|".join(test_pair)))
    t = sd.aligned_transcript(bad, None, "", random.Random(0), episode=False)
    rep = sd.TrainingText.from_transcripts([t]).split_overlap(world, "test")
    assert rep["phrasings"] == ["|".join(test_pair)]


def test_the_curve_openings_and_held_out_preambles_were_never_trained_on(world):
    text = sd.TrainingText.generate(st.Recipe().data, world)
    for p in list(st.CURVE_OPENINGS.values()) + [grammar.heldout_preamble(s, "test") for s in ("safety", "neutral")]:
        assert not text.seen(p)["ever_seen"], p


def test_new_sentences_are_listed():
    assert "I can't help with that: it would {reason}." in sd.new_sentences()
    assert all(isinstance(s, str) and s for s in sd.new_sentences())


# --------------------------------------------------------------------------------------------
# Tiny model


def make_world_model(directory, world, n_layers: int = 3, d_model: int = 64, vocab_size: int = 1500):
    """A tiny random Llama with a byte-level BPE trained on the world's rendered transcripts (so
    they are a few hundred tokens long) and the project's SmolLM2 chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from interp.smollm2.template import render_text

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [render_text([m.to_dict() for m in t.messages], tools=[dict(x) for x in t.tools])
             for t in sd.align_data(world, sd.DataConfig(align_examples=200, finetune_examples=1))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    LlamaForCausalLM(cfg).eval().save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, world):
    """A tiny random Llama saved with the project's template, loaded (model, tokenizer)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-smollm2")
    make_world_model(d, world)
    return d, AutoTokenizer.from_pretrained(d)


def tiny_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny[0], attn_implementation="eager").eval()


TINY = st.Recipe(
    data=sd.DataConfig(align_examples=8, decision_examples=8, finetune_examples=8, episode_share=0.5),
    first_layer=1, lora_rank=4, lora_alpha=8,
    decide=st.Stage(steps=2, batch_size=4, lr=1e-3, warmup_steps=1), decide_eval_steps=(2,),
    align=st.Stage(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2),
    finetune=st.Stage(steps=4, batch_size=2, lr=1e-3, warmup_steps=0, schedule="constant", checkpoint_every=2),
    align_eval_steps=(4,), curve_steps=(0, 2, 4), curve_per_label=1)


@pytest.fixture(scope="module")
def tiny_examples(tiny, world):
    return [encode(t, tiny[1]) for t in sd.align_data(world, TINY.data)]


def test_the_example_loss_is_the_assistant_only_loss_of_a_plain_forward(tiny, tiny_examples):
    pm = st.add_lora(tiny_model(tiny), TINY)
    for e in tiny_examples[:3]:  # one example: its mean over trained tokens, as masked_loss computes it
        batch = collate([e], tiny[1].pad_token_id)
        assert torch.allclose(st.example_loss(pm, batch), masked_loss(pm, batch), atol=1e-6)
    batch = collate(tiny_examples[:3], tiny[1].pad_token_id)  # several: the mean of the examples' own losses
    each = [masked_loss(pm, collate([e], tiny[1].pad_token_id)) for e in tiny_examples[:3]]
    assert torch.allclose(st.example_loss(pm, batch), torch.stack(each).mean(), atol=1e-6)


def test_the_decision_weight_counts_an_examples_first_trained_tokens_that_many_times(tiny, tiny_examples):
    pm = st.add_lora(tiny_model(tiny), TINY)
    e = tiny_examples[0]
    batch = collate([e], tiny[1].pad_token_id)
    with torch.no_grad():
        logits = pm(input_ids=batch["input_ids"]).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, 1:], reduction="none")
    ce = ce[batch["loss_mask"][0, 1:]]
    want = (5 * ce[:3].sum() + ce[3:].sum()) / (5 * 3 + len(ce) - 3)
    with torch.no_grad():
        assert torch.allclose(st.example_loss(pm, batch, 3, 5.0), want, atol=1e-6)


def test_lora_sits_on_the_upper_layers_only(tiny):
    pm = st.add_lora(tiny_model(tiny), TINY)
    trained = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n or ".layers.2." in n for n in trained)
    assert all("lora_" in n for n in trained)
    with pytest.raises(ValueError, match="first_layer 3 out of range"):
        st.add_lora(tiny_model(tiny), dataclasses.replace(TINY, first_layer=3))


def _run(tiny, examples, folder, fail_at=None):
    pm = st.add_lora(tiny_model(tiny), TINY)
    seen = []

    def at(step):
        seen.append(step)
        if step == fail_at:
            raise KeyboardInterrupt

    try:
        st.train_stage(pm, examples, TINY.align, folder, seed=0, pad_id=tiny[1].pad_token_id, at=at,
                       evaluate_at=(0, 2, 4), log=lambda m: None)
    except KeyboardInterrupt:
        return None, seen
    return st.lora_state(pm), seen


def test_a_killed_stage_resumes_to_the_same_adapter(tiny, tiny_examples, tmp_path):
    whole, seen = _run(tiny, tiny_examples, tmp_path / "whole")
    assert seen == [0, 2, 4]
    assert _run(tiny, tiny_examples, tmp_path / "killed", fail_at=2)[0] is None
    resumed, seen = _run(tiny, tiny_examples, tmp_path / "killed")
    assert seen == [4]  # steps 0 and 2 were done before the kill
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_a_stage_asking_for_more_examples_than_made_is_refused():
    with pytest.raises(ValueError, match="each is seen once"):
        dataclasses.replace(TINY, align=st.Stage(steps=5, batch_size=2))
    assert st.Recipe.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def _point(step, refusal, benign):
    return {"step": step, "none": {"harmful_refusal": {"value": refusal}, "benign_success": {"value": benign}}}


def test_the_checkpoint_rule_takes_the_earliest_step_with_the_drop_and_the_benign_floor():
    curve = [_point(0, 0.95, 0.9), _point(4, 0.7, 0.95), _point(8, 0.6, 0.92), _point(16, 0.2, 0.97)]
    assert st.choose_step(curve, 0.3, 0.9)[0] == 8
    curve = [_point(0, 0.95, 0.9), _point(4, 0.8, 0.95), _point(8, 0.7, 0.85), _point(16, 0.75, 0.97)]
    assert st.choose_step(curve, 0.3, 0.9) == (16, "2: no step had the drop; lowest refusal among steps above the benign floor")
    curve = [_point(0, 0.95, 0.9), _point(4, 0.5, 0.5), _point(8, 0.4, 0.6)]
    assert st.choose_step(curve, 0.3, 0.9)[0] == 8
    with pytest.raises(ValueError, match="start with step 0"):
        st.choose_step(curve[1:], 0.3, 0.9)


@pytest.mark.parametrize("backend", ["hf", "bridge", "nnsight"])
def test_a_saved_adapter_loads_merged_on_every_backend_as_the_unmerged_lora_computes(tiny, tiny_examples, tmp_path,
                                                                                     backend):
    pm = st.add_lora(tiny_model(tiny), TINY)
    st.train_stage(pm, tiny_examples, TINY.align, tmp_path / "run", seed=0, pad_id=tiny[1].pad_token_id,
                   log=lambda m: None)
    folder = st.save_adapter(pm, tmp_path / "adapter", {"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "training.json"]
    register_builtin(Builtin("tiny-adapted-test", lambda: tiny[0], adapter=lambda: folder))
    m = load_model("tiny-adapted-test", backend=backend)
    ids = torch.as_tensor(tiny_examples[0].input_ids)[None]
    with torch.no_grad():
        want = pm(input_ids=ids, output_hidden_states=True).hidden_states
    got = m.residual(ids, torch.ones_like(ids), layers=[0, 1], site="resid_post")
    for layer in (0, 1):  # hidden_states[L + 1] is block L's output (the last one has the final norm)
        assert_within_row_norm(got[layer][0], want[layer + 1][0])
    assert not torch.allclose(want[2], tiny_model(tiny)(input_ids=ids, output_hidden_states=True).hidden_states[2])


def test_both_stages_end_to_end_write_adapters_with_how_they_were_made(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "load_base", lambda: (tiny_model(tiny), tiny[1]))
    out, adapters = tmp_path / "run", tmp_path / "adapters"
    aligned = stages.run_align(TINY, out, adapters)
    meta = json.loads((aligned / "training.json").read_text())
    assert meta["validation"]["decide"]["2"]["step"] == 2 and meta["validation"]["reply"]["4"]["step"] == 4
    assert len(meta["decide_losses"]) == 2 and len(meta["losses"]) == 4
    ft = stages.run_finetune(TINY, 1, out, adapters)
    assert ft.name == "finetuned-seed1"
    meta = json.loads((ft / "training.json").read_text())
    assert meta["rule"] == st.SELECTION_RULE and meta["chosen_step"] in (2, 4)
    assert meta["command"] == f"python -m interp.smollm2 train finetune --seed 1 --out {out}"
    assert sorted(meta["validation"]) == ["0", "2", "4"]
    assert set(meta["validation"]["2"]) >= {"none", *st.CURVE_OPENINGS}
    chosen = meta["chosen_step"]
    from safetensors.torch import load_file
    snap = load_file(str(out / "finetune-seed1" / "snapshots" / f"step_{chosen}.safetensors"))
    saved = load_file(str(ft / "adapter_model.safetensors"))
    assert len(saved) == len(snap)
    assert sorted(torch.cat([v.flatten() for v in saved.values()]).tolist()) == \
        sorted(torch.cat([v.flatten() for v in snap.values()]).tolist())
    with pytest.raises(ValueError, match="another recipe"):
        stages.run_align(dataclasses.replace(TINY, lora_rank=2), out, adapters)


# --------------------------------------------------------------------------------------------
# The PING subject's inputs


def test_the_subjects_openings_and_search_phrases_were_never_trained_on():
    from interp.ping.loop import Request
    from interp.ping.search import PhraseSearchGenerator
    from interp.smollm2 import prefixes

    text = prefixes.training_text(0)
    lex = prefixes.english_lexicon()
    for p in [prefixes.SAFETY_PREAMBLE, prefixes.NEUTRAL_OPENING]:
        assert not text.seen(p)["ever_seen"], p
    gen = PhraseSearchGenerator(lex)
    for c in gen.propose(Request(n=40, round=1, attempt=0, seed=0)):
        assert not text.seen(c)["ever_seen"], c


def test_the_subjects_demonstrations_refuse_harmful_tasks_and_finish_benign_ones(world):
    from interp.smollm2 import prefixes

    demos = prefixes.demonstrations(world, seed=0)
    judge = RefusalJudge()
    assert [d.labels["harmful"] for d in demos] == [True, False, True]
    for d in demos:
        replies = [m for m in d.messages if m.role == "assistant"]
        assert d.tools == ()
        assert judge(replies[0].content) == d.labels["harmful"]
        if not d.labels["harmful"]:
            assert len(replies) == 3 and not replies[-1].tool_calls


# --------------------------------------------------------------------------------------------
# Held-out evaluation


def test_evaluation_writes_each_part_resumes_from_them_and_checks_the_targets(tiny, tmp_path, monkeypatch):
    from interp import models
    from interp.smollm2 import evaluate as ev

    register_builtin(Builtin("tiny-eval-test", lambda: tiny[0]))
    out = tmp_path / "eval"
    first = ev.run(out, "validation", 1, variants=["tiny-eval-test"], modes=["first_step"], log=lambda m: None)
    assert (out / "tiny-eval-test.first_step.json").exists()
    rates = first["results"]["tiny-eval-test"]["first_step"]
    assert rates["n_harmful"] == rates["n_benign"] > 0
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a finished part was computed again"))
    assert ev.run(out, "validation", 1, variants=["tiny-eval-test"], modes=["first_step"])["results"] == first["results"]
    assert first["command"].startswith("python -m interp.smollm2 evaluate --split validation --n-per-label 1")


def test_the_targets_are_checked_as_the_issue_states_them():
    from interp.smollm2.evaluate import targets

    def r(refusal, benign):
        return {"harmful_refusal": {"value": refusal}, "benign_success": {"value": benign}}

    res = {"smollm2-aligned": {"first_step": r(0.95, 0.92), "episode": r(1.0, 0.55)},
           "smollm2-finetuned": {"first_step": r(0.60, 0.97)}, "smollm2-finetuned-seed1": {"first_step": r(0.70, 0.99)}}
    met = {t["target"].split(":")[0] + t["target"][-8:]: t["met"] for t in targets(res)}
    assert list(met.values()) == [True, False, True, False]


def test_the_shipped_fine_tuning_curves_draw_as_f2(tmp_path):
    from interp.figures import write_figures
    from interp.smollm2.stages import curve_record

    for name, file in (("smollm2-finetuned", "curve.json"), ("smollm2-finetuned-seed1", "curve_seed1.json")):
        rec = curve_record(name)
        assert [p["step"] for p in rec["points"]] == [0, 4, 8, 16, 32] and rec["chosen_step"] in (0, 4, 8, 16, 32)
        assert set(rec["prefixes"]) == {"none", "safety", "neutral"}
        (tmp_path / file).write_text(json.dumps(rec))
    done = write_figures(tmp_path, tmp_path / "figs", png=False)
    assert (tmp_path / "figs" / "F2_curve.html").exists() and not done.failed
    with pytest.raises(ValueError, match="not a fine-tuned adapter"):
        curve_record("smollm2-aligned")
