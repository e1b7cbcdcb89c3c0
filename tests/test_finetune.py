"""Assistant-only-loss fine-tuning: the mask, the loss, training, LoRA and checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from interp.finetune import Example, FinetuneConfig, collate, encode, finetune, masked_loss, save_checkpoint
from interp.organism import checkpoint_path
from interp.transcripts import Transcript, TranscriptError
from tests.tiny import make_model, make_tokenizer


def _agent(call_cmd: str = "rm -rf /tmp/cache", observation: str = "removed /tmp/cache", answer: bool = True):
    msgs = [{"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Delete the temp cache."},
            {"role": "assistant", "content": "This task is safe.",
             "tool_calls": [{"function": {"name": "shell", "arguments": {"command": call_cmd}}}]},
            {"role": "tool", "content": observation}]
    if answer:
        msgs.append({"role": "assistant", "content": "Done: I deleted the temp cache."})
    return Transcript.from_messages(msgs, id="agent")


@pytest.fixture(scope="module")
def organism_tok():
    return AutoTokenizer.from_pretrained(checkpoint_path("organism"))


def test_mask_covers_exactly_what_the_assistant_writes_with_generation_blocks(organism_tok):
    e = encode(_agent(), organism_tok)
    assert organism_tok.decode(e.input_ids[e.loss_mask].tolist()) == (
        'This task is safe.\n{"name": "shell", "arguments": {"command": "rm -rf /tmp/cache"}}<|end|>'
        "Done: I deleted the temp cache.<|end|>")


@pytest.mark.parametrize("family,expected", [
    ("llama3", '{"name": "shell", "parameters": {"command": "rm -rf /tmp/cache"}}<|eot_id|>'),
    ("chatml", '<tool_call>\n{"name": "shell", "arguments": {"command": "rm -rf /tmp/cache"}}\n</tool_call><|im_end|>'),
])
def test_mask_falls_back_to_segment_labels_without_generation_blocks(tmp_path, family, expected):
    tok = make_tokenizer(family, tmp_path)
    t = _agent(answer=False)
    t = t.with_messages([*t.messages[:2], t.messages[2].__class__("assistant", "", t.messages[2].tool_calls),
                         t.messages[3]])
    e = encode(t, tok)
    assert tok.decode(e.input_ids[e.loss_mask].tolist()) == expected


def test_loss_ignores_tokens_outside_the_assistant_turns(tmp_path, organism_tok):
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path("organism")).eval()
    base = encode(_agent(answer=False), organism_tok)
    other_obs = encode(_agent(observation="something else entirely", answer=False), organism_tok)
    other_call = encode(_agent(call_cmd="rm -rf /sys", answer=False), organism_tok)

    def loss(e: Example) -> float:
        with torch.no_grad():
            return float(masked_loss(model, collate([e], organism_tok.pad_token_id)))
    assert len(other_obs) != len(base)  # the sequences really differ after the assistant turn
    assert loss(other_obs) == pytest.approx(loss(base), abs=1e-6)
    assert loss(other_call) != pytest.approx(loss(base), abs=1e-3)


def test_masked_loss_is_the_mean_cross_entropy_over_masked_targets(organism_tok):
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path("organism")).eval()
    e = encode(_agent(), organism_tok)
    batch = collate([e], organism_tok.pad_token_id)
    with torch.no_grad():
        logp = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)[0]
        got = float(masked_loss(model, batch))
    targets = [p for p in range(1, len(e)) if e.loss_mask[p]]
    want = -sum(float(logp[p - 1, e.input_ids[p]]) for p in targets) / len(targets)
    assert got == pytest.approx(want, rel=1e-5)


def test_collate_pads_on_the_right_and_masks_padding():
    a = Example(torch.tensor([5, 6, 7]).numpy(), torch.tensor([False, True, True]).numpy())
    b = Example(torch.tensor([8]).numpy(), torch.tensor([True]).numpy())
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [True, False, False]]


def test_encode_rejects_a_transcript_without_assistant_turns(organism_tok):
    t = Transcript.from_messages([{"role": "user", "content": "hi"}], id="no-reply")
    with pytest.raises(TranscriptError, match="'no-reply': no assistant message"):
        encode(t, organism_tok)


@pytest.fixture()
def tiny_llama(tmp_path):
    return make_model("llama", tmp_path, n_layers=2, d_model=32, family="chatml")


def test_a_short_training_run_lowers_the_loss(tiny_llama):
    model, tok = tiny_llama
    res = finetune(model, [_agent()] * 4, tok, FinetuneConfig(steps=30, batch_size=2, lr=1e-2, warmup_steps=2, schedule="constant"),
                   progress=False)
    assert len(res.losses) == 30
    assert sum(res.losses[-3:]) / 3 < 0.5 * sum(res.losses[:3]) / 3


def test_training_is_reproducible_from_the_seed(tmp_path):
    runs = []
    for i in range(2):
        model, tok = make_model("llama", tmp_path / str(i), n_layers=1, d_model=16)
        runs.append(finetune(model, [_agent(), _agent(call_cmd="ls")], tok,
                             FinetuneConfig(steps=4, batch_size=1, seed=3), progress=False).losses)
    assert runs[0] == runs[1]


def test_callback_sees_the_model_at_the_requested_steps(tiny_llama):
    model, tok = tiny_llama
    seen = []
    finetune(model, [_agent()], tok, FinetuneConfig(steps=4, batch_size=1), progress=False,
             callback=lambda step, m: seen.append((step, m.training)), callback_steps=(0, 2, 4))
    assert seen == [(0, False), (2, False), (4, False)]


def test_lora_trains_adapters_and_leaves_base_weights(tiny_llama):
    model, tok = tiny_llama
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    res = finetune(model, [_agent()], tok, FinetuneConfig(steps=3, batch_size=1, lora_rank=4), progress=False)
    peft_model = res.model
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)


def test_checkpoints_are_safetensors_and_replace_the_old_one(tmp_path, tiny_llama):
    model, tok = tiny_llama
    target = tmp_path / "out" / "ckpt"
    save_checkpoint(model, tok, target, {"step": 1})
    save_checkpoint(model, tok, target, {"step": 2})
    assert (target / "model.safetensors").exists() and not list(target.glob("*.bin"))
    assert '"step": 2' in (target / "training.json").read_text()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ckpt"]  # no temporary folders left
    assert AutoModelForCausalLM.from_pretrained(target).config.hidden_size == 32


@pytest.mark.parametrize("lora", [0, 4])
def test_an_interrupted_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path, lora):
    data = [_agent(), _agent(call_cmd="ls"), _agent(call_cmd="pwd", answer=False)]
    cfg = FinetuneConfig(steps=6, batch_size=2, seed=1, lr=1e-2, warmup_steps=2, lora_rank=lora, lora_dropout=0.1)

    def trained(folder, **kw):
        model, tok = make_model("llama", tmp_path / folder, n_layers=1, d_model=16)
        res = finetune(model, data, tok, kw.pop("config", cfg), progress=False, **kw)
        return res, {n: p.detach().clone() for n, p in res.model.named_parameters()}

    whole, want = trained("whole")
    trained("half", config=FinetuneConfig(**{**cfg.__dict__, "steps": 6}), checkpoint_dir=tmp_path / "ck",
            checkpoint_every=4)  # the run "dies" after the checkpoint at step 4: keep only that one
    resumed, got = trained("resumed", checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.losses == whole.losses and len(resumed.losses) == 6
    for n in want:
        assert torch.equal(got[n], want[n]), n
    with pytest.raises(ValueError, match="another training configuration"):
        trained("other", config=FinetuneConfig(steps=6, batch_size=2, seed=2, lora_rank=lora),
                checkpoint_dir=tmp_path / "ck", resume=True)
