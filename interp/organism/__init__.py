"""The built-in model organism: a synthetic agentic world, its tokenizer and chat template, and
an aligned and an agentically fine-tuned checkpoint, shipped so every command runs offline.

>>> checkpoint_path("organism").name
'organism'
"""

from __future__ import annotations

from interp.models import Builtin, register_builtin
from interp.organism import grammar, prefixes
from interp.organism.paths import CHECKPOINT_DIR, CHECKPOINTS, checkpoint_path
from interp.organism.world import HARM_CATEGORIES, Task, World, harm_baselines, stats
from interp.ping.subject import register_subject

__all__ = ["CHECKPOINTS", "CHECKPOINT_DIR", "HARM_CATEGORIES", "Task", "World", "checkpoint_path", "grammar",
           "harm_baselines", "stats"]


for _name, _folder in CHECKPOINTS.items():
    register_builtin(Builtin(_name, lambda name=_name: checkpoint_path(name),
                             description=f"the built-in model organism ({_folder})"))
register_subject("organism", prefixes.subject)
