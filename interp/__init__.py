"""Look inside LLM agents: where they refuse, where fine-tuning removes refusal, and where a
forced PING prefix puts it back.

The pipeline, one direction::

    transcripts ──render──▶ tokens + segment labels ──model──▶ activations ──▶ probes ──▶ figures

>>> import interp
>>> interp.SEGMENT_KINDS[:4]
('template', 'system', 'user', 'assistant')
"""

from interp import organism, positions  # importing a built-in model registers its names
from interp import smollm2  # noqa: F401  (registers "smollm2", "smollm2-aligned", "smollm2-finetuned")
from interp.cache import cache_activations
from interp.models import SITES, Model, hook_name, load_model
from interp.store import ActivationStore, Activations
from interp.transcripts import (SEGMENT_KINDS, Message, RenderedTranscript, ToolCall, Transcript, load_agentharm,
                                load_jsonl, render, save_jsonl)

__all__ = [
    "SEGMENT_KINDS", "SITES", "organism", "ActivationStore", "Activations", "Message", "Model", "RenderedTranscript", "ToolCall",
    "Transcript", "cache_activations", "hook_name", "load_agentharm", "load_jsonl", "load_model", "positions",
    "render", "save_jsonl",
]
