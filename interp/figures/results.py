"""Result files as the figures read them: loading, and fields that name their file and path
when they are missing or malformed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import plotly.graph_objects as go

from interp.atomic import read_text
from probes.metrics import Interval

# Records and errors


class ResultError(ValueError):
    """A result file is unreadable or lacks a field a figure needs; the message names both."""


class MissingResult(ResultError):
    """A result file a figure needs is not among the loaded results."""

    def __init__(self, name: str):
        super().__init__(f"{name} is missing from the results")
        self.name = name


class Table(NamedTuple):
    """Numbers behind a figure: column names and rows of cells (text, numbers, 95% intervals)."""

    columns: tuple[str, ...]
    rows: tuple[tuple, ...]
    title: str = ""

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""] if self.title else []
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows])


def cell(value) -> str:
    """A table cell: an interval as ``v [low, high]``, a float to three decimals, None as a dash."""
    if isinstance(value, Interval):
        return f"{value.value:.3f} [{value.low:.3f}, {value.high:.3f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class FigureSpec:
    """One figure: the plotly figure, its title and caption, and the numbers behind it."""

    key: str
    slug: str
    title: str
    caption: str
    tables: tuple[Table, ...]
    figure: go.Figure

    @property
    def stem(self) -> str:
        return f"{self.key}_{self.slug}"


class Field:
    """A value read from a result file that knows where it came from, so that a missing or
    malformed field raises a :class:`ResultError` naming the file and the path to the field."""

    __slots__ = ("value", "file", "path")

    def __init__(self, value: Any, file: str, path: str = ""):
        self.value, self.file, self.path = value, file, path

    def _child(self, key) -> str:
        return f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}" if self.path else str(key)

    def _error(self, what: str) -> ResultError:
        return ResultError(f"{self.file}: {self.path or 'the top level'} {what}")

    def __getitem__(self, key) -> Field:
        try:
            return Field(self.value[key], self.file, self._child(key))
        except (KeyError, IndexError, TypeError):
            raise self._error(f"has no field {key!r}") from None

    def get(self, key) -> Field | None:
        """The field, or None where it is absent or null."""
        present = isinstance(self.value, Mapping) and self.value.get(key) is not None
        return self[key] if present else None

    def __iter__(self) -> Iterator[Field]:
        if not isinstance(self.value, list):
            raise self._error(f"should be a list, got {type(self.value).__name__}")
        return (self[i] for i in range(len(self.value)))

    def keys(self) -> list[str]:
        if not isinstance(self.value, Mapping):
            raise self._error(f"should be an object, got {type(self.value).__name__}")
        return list(self.value)

    def __float__(self) -> float:
        try:
            return float(self.value)
        except (TypeError, ValueError):
            raise self._error(f"should be a number, got {self.value!r}") from None

    def __int__(self) -> int:
        return int(float(self))

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def floats(self) -> np.ndarray:
        try:
            return np.asarray(self.value, dtype=float)
        except (TypeError, ValueError):
            raise self._error("should hold numbers only") from None

    def interval(self) -> Interval:
        return Interval(float(self["value"]), float(self["low"]), float(self["high"]))


def result_file(results: Mapping[str, Any], name: str) -> Field:
    if name not in results:
        raise MissingResult(name)
    return Field(results[name], name)


# --------------------------------------------------------------------------------------------
# Loading

RESULT_FILES = ("behaviour.json", "curve.json", "comparison.json", "token_logits.json", "ping_history.jsonl",
                "ping_guided_history.jsonl", "attribution.json", "pca.json", "steering.json",
                "guards.json", "interactions.json")
SEED_CURVE = re.compile(r"curve_seed\d+\.json")


def load_results(results_dir: str | Path) -> dict[str, Any]:
    """Every known result file present in ``results_dir``: file name -> parsed JSON (a list of
    records for ``.jsonl``). Absent files are simply not in the dict."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultError(f"{root}: no such results directory (the pipeline's stages write it, e.g. `make demo`)")
    names = [n for n in RESULT_FILES if (root / n).is_file()]
    names += sorted(p.name for p in root.glob("curve_seed*.json") if SEED_CURVE.fullmatch(p.name))
    out = {}
    for name in names:
        text = read_text(root / name, ResultError)
        try:
            if name.endswith(".jsonl"):
                out[name] = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                out[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultError(f"{root / name}: not valid JSON ({e})") from None
    return out


# --------------------------------------------------------------------------------------------
# Shared styling
