"""The chat template the converted SmolLM2 tokenizer is saved with: ChatML with tool calling.

SmolLM2-135M-Instruct ships plain ChatML (``<|im_start|>role\\n...<|im_end|>\\n``) that renders
only ``content`` and adds a default system prompt naming the model. Agent transcripts need tool
schemas, tool calls and tool results, so **this template is the project's choice**, written for
the toolkit from the ChatML tool-calling convention that Hermes and Qwen2.5 models follow (the
model itself was not trained on any particular tool format; the project's adapters are trained
on this one):

- **Tools** are listed in the system turn, one JSON schema a line inside ``<tools></tools>``, with
  two sentences saying how to call them, *before* the system message's content (the toolkit
  labels a message's tokens by finding its content after the previous message's, so schema text
  rendered ahead of every message can never be taken for one). Without a system message the
  system turn holds only the tools.
- **No default system prompt.** SmolLM2's own template injects "You are a helpful AI assistant
  named SmolLM, trained by Hugging Face" when the conversation has no system message; here a
  transcript without a system message renders without a system turn (unless tools are offered),
  so every token the model reads comes from the transcript.
- **Assistant tool calls** follow the assistant's content, one per block, each on its own line:
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Arguments given as a JSON
  string (the OpenAI wire format) are written as they are.
- **Tool results** are ``tool`` turns, one per result and never grouped (Qwen2.5 merges
  consecutive results into one ``user`` turn), each wrapped in ``<tool_response>`` tags. Because
  no turn is merged, rendering the first k messages always gives a prefix of rendering all of
  them, so segment boundaries between messages are exact.
- What the assistant writes (its content, calls and closing ``<|im_end|>``) sits in
  ``{% generation %}`` blocks, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
  gives the assistant-only training mask.
- Generation ends at ``<|im_end|>``, the tokenizer's eos token and the generation config's
  ``eos_token_id``.

>>> print(render_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]))
<|im_start|>user
Hi<|im_end|>
<|im_start|>assistant
Hello.<|im_end|>
<BLANKLINE>
"""

from __future__ import annotations

import hashlib
import json

from transformers.utils.chat_template_utils import render_jinja_template

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
"""The ChatML turn markers; the tokenizer must hold each as one special token."""

TOOLS_PREAMBLE = (
    "# Tools\n\n"
    "These functions are available; each line between <tools> and </tools> is the JSON schema of one.\n"
)
TOOLS_USAGE = (
    "\n\nTo use a function, write a <tool_call> block holding a JSON object with the name of the "
    "function and its arguments, one block per call:\n"
    '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>'
)
"""The two pieces of fixed text in the system turn around the tool schemas."""


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal (JSON escapes are Jinja escapes too)."""
    return json.dumps(text, ensure_ascii=False)


CHAT_TEMPLATE = (
    "{#- ChatML with tool calling: the agent-refusal-interp project's template for SmolLM2 -#}"
    "{%- set ns = namespace(start=0) -%}"
    "{%- set has_system = messages and messages[0].role == 'system' -%}"
    "{%- if has_system or tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if tools -%}"
    "{{- " + _lit(TOOLS_PREAMBLE + "<tools>") + " -}}"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}"
    "{{- " + _lit("\n</tools>" + TOOLS_USAGE) + " -}}"
    "{%- if has_system and messages[0].content -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- if has_system -%}{{- messages[0].content or '' -}}{%- set ns.start = 1 -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}"
    "{%- else -%}{{- (fn.arguments if fn.arguments is defined and fn.arguments is not none else {}) | tojson -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""The Jinja chat template (see the module docstring for what it renders and why)."""


def render_text(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                template: str = CHAT_TEMPLATE) -> str:
    """The text the template renders for OpenAI-style ``messages`` (no tokenizer needed), through
    the same Jinja environment ``apply_chat_template`` uses."""
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def template_sha256(template: str = CHAT_TEMPLATE) -> str:
    """A fingerprint of a template, kept in the converted checkpoint's manifest so a cache made
    with another template is seen as stale."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


__all__ = ["CHAT_TEMPLATE", "IM_END", "IM_START", "render_text", "template_sha256"]
