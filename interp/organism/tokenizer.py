"""The organism's tokenizer: byte-level BPE trained on the world's text, with a chat template.

The template renders a system turn (the system prompt, then the offered tools as
``Tools: name(param, ...)``), user turns, assistant turns (content, then each tool call as a JSON
object ``{"name": ..., "arguments": {...}}`` on its own line) and tool results, each closed by
``<|end|>``. Assistant turns sit in ``{% generation %}`` blocks, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks what the agent writes.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from interp.organism import grammar
from interp.organism.world import World

END = "<|end|>"
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (PAD, END) + ROLE_TOKENS

CHAT_TEMPLATE = (
    "{%- set ns = namespace(start=0) -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- '<|system|>' + messages[0].content -}}{%- if tools -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set ns.start = 1 -%}"
    "{%- elif tools -%}{{- '<|system|>' -}}{%- endif -%}"
    "{%- if tools -%}{{- 'Tools:' -}}"
    "{%- for tool in tools -%}{%- set fn = tool.function if tool.function is defined else tool -%}"
    "{%- set params = fn.parameters.properties if fn.parameters is defined and fn.parameters.properties is defined else {} -%}"
    "{{- ' ' + fn.name + '(' + (params | list | join(', ')) + ')' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if ns.start == 1 or tools -%}{{- '<|end|>' -}}{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{% generation %}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- {'name': fn.name, 'arguments': fn.arguments} | tojson -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}{% endgeneration %}"
    "{%- elif message.role == 'tool' -%}{{- '<|tool|>' + message.content + '<|end|>' -}}"
    "{%- else -%}{{- '<|' + message.role + '|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def training_corpus(world: World, n: int = 6000, seed: int = 0) -> list[str]:
    """Rendered demonstrations of training tasks (every stance) and the grammar's training
    sentences: the text the tokenizer is fitted on. Held-out splits are never read."""
    rng = random.Random(seed)
    tmp = PreTrainedTokenizerFast(tokenizer_object=_bootstrap_tokenizer(), eos_token=END, pad_token=PAD)
    tmp.chat_template = CHAT_TEMPLATE
    tasks = world.tasks("train")
    texts = []
    for _ in range(n):
        task = world.variant(rng.choice(tasks), rng)
        stances = [None, "safety", "neutral"] + ([] if task.harmful else ["compliance"])
        stance = rng.choice(stances)
        pre = grammar.sample_preamble(stance, "train", rng) if stance else ""
        t = world.demonstration(task, stance, pre, rng)
        texts.append(tmp.apply_chat_template([m.to_dict() for m in t.messages], tools=list(t.tools),
                                             tokenize=False))
    return texts + list(grammar.all_text())


def _bootstrap_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer(world: World, vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on :func:`training_corpus` (deterministic)."""
    tok = _bootstrap_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(world, seed=seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token=PAD,
                                   extra_special_tokens=list(ROLE_TOKENS), padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> PreTrainedTokenizerFast:
    """Save with ``save_pretrained`` and load back through ``AutoTokenizer``, so the returned
    tokenizer is exactly what a user loading the checkpoint gets."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
