"""Research helper (not part of the package), shared by smollm2_likelihood_auroc.py and
smollm2_decision_first.py: each validation task with two teacher-forced first replies (its own
thought + first tool call, and a fixed refusal), and the summed log-likelihood of a reply."""
import dataclasses
import random

import numpy as np
import torch

from interp.finetune import collate, encode
from interp.smollm2 import data as sd
from interp.transcripts import Message, ToolCall

REFUSAL = "I can't help with that."


def act_and_refusal(world, split="validation", n=40, seed=0):
    """(acts, refusals, benign): the tasks as SmolLM2's agent sees them, each once with its own
    first action (a harmful task's as its benign twin would start) and once refused."""
    rng, acts, refs = random.Random(0), [], []
    tasks = world.sample(split, n, seed)
    for task in tasks:
        t = sd.agent_view(task.transcript())
        b = dataclasses.replace(task, harmful=False) if task.harmful else task
        call = ToolCall(task.calls[0].name, task.calls[0].arguments, "call_0")
        acts.append(t.with_messages(list(t.messages) + [Message("assistant", sd.first_thought(b, rng), (call,))]))
        refs.append(t.with_messages(list(t.messages) + [Message("assistant", REFUSAL)]))
    return acts, refs, np.array([not t.harmful for t in tasks])


def reply_logprob(model, tok, transcripts, batch_size=16):
    """Summed log P of each transcript's assistant tokens, teacher-forced."""
    es, out = [encode(t, tok) for t in transcripts], []
    for s in range(0, len(es), batch_size):
        b = collate(es[s:s + batch_size], tok.pad_token_id)
        with torch.no_grad():
            lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float().log_softmax(-1)
        ll = lg.gather(-1, b["input_ids"][:, 1:, None])[..., 0] * b["loss_mask"][:, 1:]
        out += ll.sum(1).tolist()
    return np.array(out)
