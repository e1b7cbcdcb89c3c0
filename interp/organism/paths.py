"""Where the organism's shipped checkpoints live, and the names they go by."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
CHECKPOINTS = {"organism": "organism", "organism-aligned": "organism", "organism-finetuned": "organism-finetuned",
               "organism-distributed": "organism-distributed"}
"""Model names and the checkpoint folder each one is."""


def checkpoint_path(name: str, root: str | Path | None = None) -> Path:
    """The folder of a shipped organism checkpoint (``save_pretrained`` format, tokenizer
    included): ``"organism"`` (aligned), ``"organism-finetuned"`` or ``"organism-distributed"``
    (:mod:`interp.organism.variant`). ``root`` looks in another training output folder instead of
    the package's."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown organism checkpoint {name!r} (expected one of {', '.join(CHECKPOINTS)})")
    path = Path(root or CHECKPOINT_DIR) / CHECKPOINTS[name]
    if not (path / "config.json").exists():
        command = "interp.organism.variant train" if name == "organism-distributed" else "interp.organism train"
        raise FileNotFoundError(f"{path}: no checkpoint there; make one with `python -m {command} --out {path.parent}`")
    return path
