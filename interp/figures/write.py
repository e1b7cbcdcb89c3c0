"""Writing the figures: HTML sharing one offline ``plotly.min.js``, PNG through kaleido when a
Chromium is there, and a README index with captions and the numbers behind each figure."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.io as pio
from choreographer.browsers.chromium import Chromium
from plotly.offline import get_plotlyjs

from interp.atomic import atomic_path, write_text
from interp.figures.behaviour import (fig_f1_behaviour, fig_f2_curve, fig_f5_ping_search, fig_f8_steering,
                                      fig_f9_guards)
from interp.figures.interactions import fig_f10_interactions
from interp.figures.internals import fig_f3_probes, fig_f4_token_logits, fig_f6_attribution, fig_f7_pca
from interp.figures.results import FigureSpec, MissingResult, ResultError, load_results
from interp.figures.style import HEIGHT, WIDTH

FIGURES: dict[str, Callable[[Mapping[str, Any]], FigureSpec]] = {
    "F1": fig_f1_behaviour, "F2": fig_f2_curve, "F3": fig_f3_probes, "F4": fig_f4_token_logits,
    "F5": fig_f5_ping_search, "F6": fig_f6_attribution, "F7": fig_f7_pca, "F8": fig_f8_steering,
    "F9": fig_f9_guards, "F10": fig_f10_interactions,
}


@dataclass(frozen=True)
class Written:
    """What :func:`write_figures` did: the figures built (all whose results exist, for the README
    index), the files written, and one note per figure skipped or failed and for PNG export."""

    figures: tuple[FigureSpec, ...]
    files: tuple[Path, ...]
    notes: tuple[str, ...]
    failed: bool


def build_figures(results: Mapping[str, Any],
                  source: str | Path = "the results") -> tuple[dict[str, FigureSpec], dict[str, str], bool]:
    """Every figure whose results exist: (key -> spec, key -> note for the others, any failed)."""
    specs, notes, failed = {}, {}, False
    for key, build in FIGURES.items():
        try:
            specs[key] = build(results)
        except MissingResult as e:
            notes[key] = f"{key} skipped: {e.name} not found in {source}"
        except ResultError as e:
            notes[key], failed = f"{key} failed: {e}", True
    return specs, notes, failed


def write_figures(results_dir: str | Path, out_dir: str | Path = "figures", only: Sequence[str] | None = None,
                  png: bool = True) -> Written:
    """Write ``F{n}_{slug}.html`` (and ``.png`` with ``png`` and a Chromium) for each figure in
    ``only`` (default all) whose results exist, the shared ``plotly.min.js``, and ``README.md``
    indexing every figure the results allow (so ``only`` re-renders some without losing the rest)."""
    unknown = sorted(set(only or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    specs, notes, failed = build_figures(load_results(results_dir), results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [specs[k] for k in (only or FIGURES) if k in specs]
    files = [_write_plotlyjs(out)]
    for s in chosen:
        files.append(out / f"{s.stem}.html")
        write_text(files[-1], s.figure.to_html(include_plotlyjs="plotly.min.js", full_html=True, div_id=s.stem))
        (out / f"{s.stem}.png").unlink(missing_ok=True)  # an older PNG would no longer match the HTML
    extra = []
    if png and chosen:
        if _browser() is None:
            extra.append("PNGs not written (kaleido needs Chromium): apt-get install -y chromium, "
                         "or set BROWSER_PATH to a Chrome/Chromium binary")
        else:
            files += _write_pngs(chosen, out)
    files.append(out / "README.md")
    write_text(files[-1], _readme(list(specs.values()), notes, results_dir, out))
    return Written(tuple(specs.values()), tuple(files),
                   tuple(notes[k] for k in (only or FIGURES) if k in notes) + tuple(extra), failed)


def _write_plotlyjs(out: Path) -> Path:
    path, js = out / "plotly.min.js", get_plotlyjs()
    if not (path.is_file() and path.read_text(encoding="utf-8") == js):
        write_text(path, js)
    return path


def _browser() -> str | None:
    """The Chromium kaleido would use (BROWSER_PATH, PATH, or its own download), if it is there."""
    path = Chromium.find_browser(skip_local=False)
    return path if path and os.access(path, os.X_OK) else None


def _write_pngs(specs: Sequence[FigureSpec], out: Path) -> list[Path]:
    paths = [out / f"{s.stem}.png" for s in specs]
    with ExitStack() as stack:  # one browser session for all figures; each file renamed into place at the end
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        pio.write_images([s.figure for s in specs], tmps, format="png", width=WIDTH,
                         height=[s.figure.layout.height or HEIGHT for s in specs])
    return paths


def _readme(specs: Sequence[FigureSpec], notes: Mapping[str, str], results_dir, out: Path) -> str:
    parts = ["# Figures", "",
             f"Generated by `python -m interp.figures --results {results_dir}` from the stored result files; "
             "every number below is read from them. Rerun the command to update; do not edit by hand.", ""]
    for s in specs:
        parts += [f"## {s.title}", ""]
        if (out / f"{s.stem}.png").is_file():
            parts += [f"![{s.key}]({s.stem}.png)", ""]
        parts += [f"[interactive]({s.stem}.html)", "", s.caption, ""]
        parts += [line for t in s.tables for line in (t.markdown(), "")]
    if notes:
        parts += ["## Not built", "", *(f"- {n}" for n in notes.values()), ""]
    return "\n".join(parts)
