"""Loaders: JSONL records, Hugging Face datasets, AgentHarm behaviours; and the JSONL writer.

Labels are kept exactly as the file gives them; :func:`~interp.transcripts.binary_label` is the
one place that reads a label as a class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from interp.atomic import write_lines

from .records import Message, Transcript, TranscriptError, fail, from_record


def load_jsonl(path: str | Path) -> list[Transcript]:
    """Read a JSONL file of ``{messages, tools?, labels?}`` records (one transcript per line)."""
    path = Path(path)
    out = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TranscriptError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start} "
                                  "of the line)") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TranscriptError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(rec, dict):
            rec.setdefault("id", f"{path.stem}:{lineno}")
        out.append(from_record(rec, str(path), f"{lineno} (line {lineno})"))
    if not out:
        raise TranscriptError(f"{path}: no transcripts in file")
    return out


def save_jsonl(transcripts: Iterable[Transcript], path: str | Path) -> None:
    """Write transcripts as JSONL, atomically (a reader never sees half a file)."""
    write_lines(path, [json.dumps(t.to_record(), ensure_ascii=False) for t in transcripts])


def from_dataset(dataset: Any, source: str | None = None) -> list[Transcript]:
    """Transcripts from a Hugging Face ``datasets.Dataset`` (or a path saved with ``save_to_disk``).

    Rows need a ``messages`` column; ``tools``, ``labels``, ``metadata``, ``prefix`` and ``id`` are
    optional. Store tool-call arguments as JSON strings: ``datasets`` unifies nested dicts across
    rows and would add keys to them (labels too: a key missing from one row reads as null there).
    """
    if isinstance(dataset, (str, Path)):
        import datasets  # deferred: importing it (pyarrow, pandas) costs seconds; only this loader needs it

        source = source or str(dataset)
        try:
            dataset = datasets.load_from_disk(str(dataset))
        except FileNotFoundError as e:
            raise TranscriptError(f"{dataset}: not a dataset saved with save_to_disk ({e})") from None
    if "messages" not in getattr(dataset, "column_names", ()):
        raise TranscriptError(f"{source or 'dataset'}: no 'messages' column (columns: {getattr(dataset, 'column_names', None)})")
    out = [from_record(_drop_nulls(row), source or "dataset", i) for i, row in enumerate(dataset)]
    if not out:
        raise TranscriptError(f"{source or 'dataset'}: dataset is empty")
    return out


def _drop_nulls(row: Mapping) -> dict:
    """Arrow fills missing struct fields with None; treat those as absent."""
    def clean(x):
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    row = dict(row)
    row["messages"] = clean(row.get("messages"))
    return row


DEFAULT_AGENT_SYSTEM_PROMPT = (
    "You are a helpful agent. Use the tools provided to complete the user's task."
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise TranscriptError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TranscriptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _agentharm_tools(fns: list[str]) -> tuple[dict, ...]:
    return tuple({"type": "function", "function": {"name": f, "description": f.replace("_", " "),
                                                   "parameters": {"type": "object", "properties": {}}}}
                 for f in fns)


def load_agentharm(path: str | Path, harmful: bool | None = None,
                   system_prompt: str = DEFAULT_AGENT_SYSTEM_PROMPT) -> list[Transcript]:
    """AgentHarm-style behaviour JSON (``{"behaviors": [{id, name, category, prompt,
    target_functions, ...}]}`` or a bare list) turned into single-turn agent transcripts.

    Each target function becomes an offered tool schema (AgentHarm ships the tools as code, so
    the schema has a name and no parameters). ``harmful`` defaults to ``"benign" not in`` the
    file name, as AgentHarm names its benign split.
    """
    path = Path(path)
    if harmful is not None and not isinstance(harmful, bool):
        raise TypeError(f"harmful must be True, False or None, got {harmful!r}")
    data = _read_json(path)
    behaviours = data.get("behaviors", data.get("behaviours")) if isinstance(data, Mapping) else data
    if not isinstance(behaviours, list) or not behaviours:
        raise TranscriptError(f"{path}: expected a non-empty 'behaviors' list")
    if harmful is None:
        harmful = "benign" not in path.name.lower()
    out = []
    for i, b in enumerate(behaviours):
        if not isinstance(b, Mapping):
            fail("behaviour must be an object", str(path), i)
        for key in ("id", "prompt", "target_functions"):
            if key not in b:
                fail(f"missing field {key!r}", str(path), i, key)
        if not isinstance(b["prompt"], str) or not b["prompt"].strip():
            fail("prompt must be a non-empty string", str(path), i, "prompt")
        fns = b["target_functions"]
        if not isinstance(fns, list) or not all(isinstance(f, str) for f in fns):
            fail("target_functions must be a list of function names", str(path), i, "target_functions")
        t = Transcript(
            messages=(Message("system", system_prompt), Message("user", b["prompt"])),
            tools=_agentharm_tools(fns), labels={"harmful": harmful, "category": b.get("category"), "name": b.get("name")},
            metadata={k: v for k, v in b.items() if k != "prompt"}, id=str(b["id"]), source=f"{path}, record {i}")
        out.append(t)
    return out
