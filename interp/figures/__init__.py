"""The paper's figures F1–F8, the guard comparison F9 and the remote connections F10, built only from stored result files (never retrains or re-caches).

Each ``fig_f*`` builder is a pure function of :func:`load_results`'s dict (file name -> parsed
JSON, a list of records for ``.jsonl``) that returns a :class:`FigureSpec`: the plotly figure,
its title, a caption and the numbers behind it. :func:`write_figures` writes every figure it can
build as HTML (sharing one offline ``plotly.min.js``) and PNG (kaleido, when a Chromium is
found), plus a ``README.md`` index with captions and tables::

    python -m interp.figures --results runs/demo/results --out figures
    python -m interp.figures --only F1,F4 --no-png

In a notebook: ``fig_f4_token_logits(load_results("runs/demo/results")).figure.show()``.

A figure whose result file is missing is skipped with a note; a builder called on results that
lack a file or a field raises :class:`ResultError` naming the file and the field.
"""

from interp.figures.behaviour import (fig_f1_behaviour, fig_f2_curve, fig_f5_ping_search, fig_f8_steering,
                                      fig_f9_guards)
from interp.figures.interactions import fig_f10_interactions
from interp.figures.internals import fig_f3_probes, fig_f4_token_logits, fig_f6_attribution, fig_f7_pca
from interp.figures.results import RESULT_FILES, FigureSpec, MissingResult, ResultError, Table, load_results
from interp.figures.write import FIGURES, Written, build_figures, write_figures

__all__ = [
    "FIGURES", "RESULT_FILES", "FigureSpec", "MissingResult", "ResultError", "Table", "Written", "build_figures",
    "fig_f10_interactions", "fig_f1_behaviour", "fig_f2_curve", "fig_f3_probes", "fig_f4_token_logits", "fig_f5_ping_search",
    "fig_f6_attribution", "fig_f7_pca", "fig_f8_steering", "fig_f9_guards", "load_results", "write_figures",
]
