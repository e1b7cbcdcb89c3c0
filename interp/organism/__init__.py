"""The built-in model organism: a synthetic agentic world, its tokenizer and chat template, and
an aligned and an agentically fine-tuned checkpoint, shipped so every command runs offline.

>>> checkpoint_path("organism").name
'organism'
"""

from __future__ import annotations

from pathlib import Path

from interp.organism import grammar
from interp.organism.world import HARM_CATEGORIES, Task, World, harm_baselines, stats

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
CHECKPOINTS = {"organism": "organism", "organism-aligned": "organism", "organism-finetuned": "organism-finetuned"}
"""Model names and the checkpoint folder each one is."""


def checkpoint_path(name: str, root: str | Path | None = None) -> Path:
    """The folder of a shipped organism checkpoint (``save_pretrained`` format, tokenizer
    included): ``"organism"`` (aligned) or ``"organism-finetuned"``. ``root`` looks in another
    training output folder instead of the package's."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown organism checkpoint {name!r} (expected one of {', '.join(CHECKPOINTS)})")
    path = Path(root or CHECKPOINT_DIR) / CHECKPOINTS[name]
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no checkpoint there; make one with `python -m interp.organism train "
                                f"--out {path.parent}`")
    return path


__all__ = ["CHECKPOINTS", "CHECKPOINT_DIR", "HARM_CATEGORIES", "Task", "World", "checkpoint_path", "grammar",
           "harm_baselines", "stats"]


def _register() -> None:
    from interp.models import Builtin, register_builtin

    for name, folder in CHECKPOINTS.items():
        register_builtin(Builtin(name, lambda name=name: checkpoint_path(name),
                                 description=f"the built-in model organism ({folder})"))


_register()
