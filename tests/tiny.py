"""Tiny random models and tokenizers for tests: built from configs, never downloaded.

Two chat-template families, both rendering tools and tool calls:
- a Llama-3-style header template (``<|start_header_id|>role<|end_header_id|>``), tools as JSON
  lines in the system header, calls as ``{"name": ..., "parameters": ...}``;
- a ChatML template (``<|im_start|>role``) with ``<tool_call>`` tags, whose consecutive tool
  results share one user turn (so leading parts of a conversation are *not* prefixes of the
  whole, which exercises the renderer's fallback).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

LLAMA3_STYLE_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set has_system = messages and messages[0].role == 'system' -%}"
    "{%- if tools and not has_system -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nTools available:\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message.role == 'system' and tools -%}"
    "{{- 'Tools available:\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- if message.content -%}{{- message.content | trim -}}{%- endif -%}"
    "{%- if message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if not loop.first or message.content -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '{\"name\": \"' + fn.name + '\", \"parameters\": ' + (fn.arguments | tojson) + '}' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content -}}{%- else -%}You are a helpful agent.{%- endif -%}"
    "{{- '\\n\\n# Tools\\n<tools>\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '</tools><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' + (fn.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

FAMILIES = {
    "llama3": dict(
        template=LLAMA3_STYLE_TEMPLATE,
        specials=["<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|pad|>",
    ),
    "chatml": dict(
        template=CHATML_TEMPLATE,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
    ),
}

CORPUS = [
    "You are a helpful agent. Use the tools to finish the task.",
    "Open the page and click the submit button, then post the weekly team update.",
    "Delete the temp cache files and list the directory.",
    '{"name": "click", "arguments": {"element": "submit"}} {"status": "ok", "items": [1, 2, 3]}',
    "Résumé naïve café — 日本語のテキスト ✓",
]


def make_tokenizer(family: str, directory: str | Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the family's specials and chat template, save it
    to ``directory`` and load it back (so it behaves like any tokenizer read from disk)."""
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"])
    fast.chat_template = spec["template"]
    directory = Path(directory)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def make_model(arch: str, directory: str | Path, family: str = "llama3", n_layers: int = 3,
               d_model: int = 64, n_ctx: int = 1024, seed: int = 0):
    """A tiny random ``arch`` model (llama, qwen2, gpt2) saved with its tokenizer in ``directory``."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    directory = Path(directory)
    tok = make_tokenizer(family, directory)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_ctx, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_ctx, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=n_ctx, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.eval().save_pretrained(directory)
    return model, tok
