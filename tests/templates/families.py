"""Real chat templates (see SOURCES.md) and tokenizers to render them with.

SmolLM2 comes with its real tokenizer (extracted from the GGUF the project ships). For the other
families no tokenizer can be downloaded here, so each gets a small byte-level BPE tokenizer with
the family's control tokens added as special tokens: the template's markup then tokenises as it
does for the real model (one token per control token), while ordinary text splits as BPE does.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Family:
    """A template family: its file, control tokens and what its template can render."""

    name: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    tools: bool = True  # renders tool calls and tool results
    multi_calls: bool = True  # more than one call per assistant message
    system: bool = True
    alternate: bool = False  # user/assistant must alternate (tool messages aside)
    id9: bool = False  # tool-call ids must be 9 alphanumeric characters
    kwargs: dict = field(default_factory=dict)  # chat_template_kwargs for a reproducible rendering

    @property
    def template(self) -> str:
        return (HERE / f"{self.name}.jinja").read_text(encoding="utf-8")


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
            "<｜tool▁sep｜>")

FAMILIES = {f.name: f for f in (
    Family("llama3.1", ("<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|python_tag|>"), "<|begin_of_text|>", "<|eot_id|>", multi_calls=False,
           kwargs={"date_string": "26 Jul 2024"}),
    Family("mistral-nemo", ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>",
           alternate=True, id9=True),
    Family("qwen2.5", QWEN_SPECIALS, None, "<|im_end|>"),
    Family("qwen3", QWEN_SPECIALS + ("<think>", "</think>", "<tool_response>", "</tool_response>"), None,
           "<|im_end|>"),
    Family("deepseek-r1", DEEPSEEK, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    Family("glm-4.6", ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>",
                       "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                       "</arg_value>", "<tool_response>", "</tool_response>", "<|endoftext|>"), None, "<|endoftext|>"),
    Family("phi-3.5", ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>",
           "<|endoftext|>", tools=False),
    Family("hermes-3", ("<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                        "<tool_response>", "</tool_response>"), "<|begin_of_text|>", "<|im_end|>"),
    Family("granite-3.3", ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"), None,
           "<|end_of_text|>", tools=False),  # renders tool results but drops tool calls
    Family("smollm2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>", tools=False),
)}

CORPUS = [
    "You are a helpful agent. Use the tools to finish the task and report back.",
    "Open the page, click the submit button, then post the weekly team update.",
    '{"name": "click", "arguments": {"element": "submit"}} {"status": "ok", "items": [1, 2, 3]}',
    "Résumé naïve café — 日本語のテキスト ✓ user assistant system tool ipython",
]


@functools.lru_cache(maxsize=None)
def tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer carrying the family's real chat template (cached: treat as read-only)."""
    fam = FAMILIES[name]
    if name == "smollm2":
        tok = Tokenizer.from_str(gzip.decompress((HERE / "smollm2-tokenizer.json.gz").read_bytes()).decode("utf-8"))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(fam.specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos)
    fast.chat_template = fam.template
    return fast
