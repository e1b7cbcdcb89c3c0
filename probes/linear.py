"""Logistic probes, as scikit-learn estimators: :class:`LayerProbes` fits one probe per layer of
``[n, n_layers, d]`` activations, all layers at once; :class:`LinearProbe` is the probe of one
layer, on ``[n, d]``. One implementation serves both (a LinearProbe is the one-layer view of
it), and :meth:`LayerProbes.probe` hands out the LinearProbe of any fitted layer.

Both minimise exactly what ``sklearn.linear_model.LogisticRegression(C=C)`` minimises on the
standardised features ``z = (x - mean_) / scale_``::

    C * sum_i logloss(y_i, w . z_i + b) + 0.5 * ||w||^2        (b is not penalised)

and report ``coef_``/``intercept_`` in the original input space (``coef_ = w / scale_``), so
``X @ coef_.T + intercept_`` is the decision function on raw activations. The solver (batched
over layers, in torch) is described in :mod:`probes._solver`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError

from . import _persist
from ._fit import fit_arrays
from ._persist import PER_LAYER as _PER_LAYER
from ._solver import decision
from .directions import _as_tensor

__all__ = ["DEFAULT_CS", "LayerProbes", "LinearProbe", "fit_layer_probes"]

DEFAULT_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _check_finite_output(dec: np.ndarray, x: torch.Tensor) -> None:
    if np.all(np.isfinite(dec)):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError("X contains NaN or inf (the decision function is not finite)")
    raise ValueError(
        "the decision function overflowed float64 (X @ coef_ is not finite): X is far larger "
        "than the data the probe was fitted on"
    )


class _LogisticProbes(ClassifierMixin, BaseEstimator):
    """What :class:`LayerProbes` and :class:`LinearProbe` share: fit, decision_function,
    predict_proba, predict, save and load, all computed on the fitted state stacked per layer
    (``coef [L, d]``, ``intercept [L]``, ...). A subclass says how its X maps to ``[n, L, d]``
    (:meth:`_layers_of`), how its outputs drop the layer axis (:meth:`_unstack`), and how its
    fitted attributes hold the stacked state (:meth:`_stacked`, :meth:`_set_stacked`)."""

    def _layers_of(self, X, *, fitting: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def _unstack(self, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _stacked(self) -> dict:
        raise NotImplementedError

    def _set_stacked(self, fitted: dict) -> None:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X, y) first"
            )

    def fit(self, X, y, groups=None):
        """Fit on X (``[n, n_layers, d]`` for LayerProbes, ``[n, d]`` for LinearProbe) and
        y ``[n]`` (two classes). groups ``[n]``: folds of the cross-validation that chooses C
        when ``C=None`` keep each group on one side (unused otherwise). Returns self."""
        x = self._layers_of(X, fitting=True)
        fitted = fit_arrays(
            x,
            y,
            self.C,
            Cs=self.Cs,
            cv=self.cv,
            groups=groups,
            standardize=self.standardize,
            max_iter=self.max_iter,
            tol=self.tol,
            rank=self.rank,
            random_state=self.random_state,
            device=self.device,
            dtype=self.dtype,
        )
        self._set_stacked(fitted)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits of ``classes_[1]``, float64: ``[n, n_layers]`` (LayerProbes), ``[n]``
        (LinearProbe)."""
        x = self._layers_of(X)
        s = self._stacked()
        dec = decision(x, s["coef_"][:, :, None], s["intercept_"][:, None])[:, :, 0]
        _check_finite_output(dec, x)
        return self._unstack(dec)

    def predict_proba(self, X) -> np.ndarray:
        """P(classes_[0]), P(classes_[1]) on the last axis: ``[n, n_layers, 2]`` or ``[n, 2]``."""
        p1 = _sigmoid(self.decision_function(X))
        return np.stack([1.0 - p1, p1], axis=-1)

    def predict(self, X) -> np.ndarray:
        """Predicted labels (entries of ``classes_``): ``[n, n_layers]`` or ``[n]``."""
        positive = self.decision_function(X) > 0  # first: it checks that self is fitted
        return self.classes_[positive.astype(np.int64)]

    def save(self, path) -> None:
        """Write ``path`` (safetensors: the fitted arrays) and ``path.with_suffix('.json')``
        (hyper-parameters, classes, layer names), atomically: a failed save leaves no file."""
        self._check_fitted()
        fmt = f"probes.{type(self).__name__}"
        _persist.save_probe(path, fmt, self.get_params(), self._stacked())

    @classmethod
    def load(cls, path):
        """The probe saved at ``path`` by :meth:`save` (or by the version 1 format before it)."""
        params, fitted = _persist.load_probe(path, f"probes.{cls.__name__}")
        probe = cls(**params)
        probe._set_stacked(fitted)
        return probe


class LayerProbes(_LogisticProbes):
    """One L2-regularised logistic probe per layer, fitted all at once; a scikit-learn estimator
    on X ``[n, n_layers, d]`` (numpy or torch, any float dtype) and y ``[n]`` (two classes).

    C: inverse regularisation strength, as in ``LogisticRegression(C=C)``: one number, one per
    layer, or None to choose it per layer by ``cv``-fold cross-validated accuracy over ``Cs``
    (folds stratified by class, and grouped by ``fit(..., groups=[n])`` when given; ties go to
    the smallest C). standardize: scale each feature to unit variance first (the penalty then
    acts on standardised weights). rank: size of the block of leading principal directions the
    solver starts from (0 disables it; any value gives the same optimum). layers: a name per
    layer (str or int), kept in ``layers_``. device/dtype: where and in which precision the
    ``[n_layers, n, d]`` working copy lives (default: X's device; float32 unless X is float64);
    small problems are solved in float64.

    Fitted attributes (float64, original input space): ``coef_ [n_layers, d]``,
    ``intercept_ [n_layers]`` (layer i's logit is ``X[:, i] @ coef_[i] + intercept_[i]``),
    ``classes_ [2]`` (``classes_[1]`` is the positive class), ``C_ [n_layers]``, ``mean_`` and
    ``scale_ [n_layers, d]`` (``z = (x - mean_) / scale_``), ``n_iter_ [n_layers]``, ``layers_``,
    ``n_features_in_`` (= d), and, when C was chosen by cross-validation, ``Cs_`` (the sorted
    candidates) and ``cv_scores_ [n_layers, len(Cs_)]`` (both None otherwise). Warns
    (``ConvergenceWarning``) for a layer whose gradient did not fall below ``tol``.

    Predictions have a layer axis: ``decision_function`` ``[n, n_layers]``, ``predict_proba``
    ``[n, n_layers, 2]``, ``predict`` ``[n, n_layers]``, :meth:`score_layers` ``[n_layers]``.
    :meth:`score` is their mean over layers, one number, as scikit-learn's multi-output
    estimators average their outputs, so ``cross_val_score``, ``GridSearchCV`` (e.g. over C for
    all layers) and ``Pipeline`` work with their default scoring.

    >>> import numpy as np
    >>> from sklearn.model_selection import cross_val_score
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(120) % 2
    >>> X = rng.standard_normal((120, 2, 8))  # [n, n_layers, d]
    >>> X[:, 1, 0] += 3 * y  # only layer 1 carries the label
    >>> probes = LayerProbes(C=1.0, layers=["early", "late"]).fit(X, y)
    >>> probes.coef_.shape, probes.predict_proba(X).shape
    ((2, 8), (120, 2, 2))
    >>> [bool(acc > 0.9) for acc in probes.score_layers(X, y)]
    [False, True]
    >>> bool(0.5 < cross_val_score(LayerProbes(C=1.0), X, y, cv=3).mean() < 0.9)
    True
    """

    def __init__(
        self,
        C: float | Sequence[float] | None = 1.0,
        *,
        Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 5,
        standardize: bool = True,
        max_iter: int = 100,
        tol: float = 1e-5,
        rank: int = 64,
        layers: Sequence | None = None,
        random_state: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.rank = rank
        self.layers = layers
        self.random_state = random_state
        self.device = device
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    @property
    def n_layers(self) -> int:
        """Number of fitted layers."""
        self._check_fitted()
        return self.coef_.shape[0]

    def _layers_of(self, X, *, fitting: bool = False) -> torch.Tensor:
        if not fitting:
            self._check_fitted()
        x = _as_tensor(X, "X", (3,), check_finite=False)
        if fitting and self.layers is not None:
            layers = tuple(self.layers)
            if len(layers) != x.shape[1] or len(set(layers)) != x.shape[1]:
                raise ValueError(
                    f"layers must name each of the {x.shape[1]} layers of X once; "
                    f"got {list(layers)!r}"
                )
        if not fitting and tuple(x.shape[1:]) != self.coef_.shape:
            L, d = self.coef_.shape
            raise ValueError(
                f"X must be [n, {L}, {d}] (n_layers, d of the fit); got shape {tuple(x.shape)}"
            )
        return x

    def _unstack(self, out: np.ndarray) -> np.ndarray:
        return out

    def _stacked(self) -> dict:
        names = (*_PER_LAYER, "classes_", "Cs_", "layers_")
        return {name: getattr(self, name) for name in names}

    def _set_stacked(self, fitted: dict) -> None:
        for name in (*_PER_LAYER, "classes_", "Cs_"):
            setattr(self, name, fitted[name])
        n_layers, self.n_features_in_ = self.coef_.shape
        layers = fitted.get("layers_")
        if layers is None:
            layers = tuple(self.layers) if self.layers is not None else tuple(range(n_layers))
        self.layers_ = layers

    def score_layers(self, X, y, sample_weight=None) -> np.ndarray:
        """Accuracy of each layer's probe ``[n_layers]`` on X ``[n, n_layers, d]``, y ``[n]``
        (weighted by ``sample_weight [n]`` when given)."""
        x = self._layers_of(X)
        yy = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
        if yy.shape != (x.shape[0],):
            raise ValueError(f"y must be [n] with n={x.shape[0]} (rows of X); got shape {yy.shape}")
        correct = self.predict(x) == yy[:, None]
        if sample_weight is None:
            return correct.mean(0)
        return np.average(correct, axis=0, weights=np.asarray(sample_weight, dtype=np.float64))

    def score(self, X, y, sample_weight=None) -> float:
        """Mean over layers of :meth:`score_layers`: one number, for scikit-learn's tools."""
        return float(np.mean(self.score_layers(X, y, sample_weight)))

    def probe(self, layer) -> LinearProbe:
        """The fitted :class:`LinearProbe` of ``layer`` (an entry of ``layers_``)."""
        self._check_fitted()
        if layer not in self.layers_:
            raise ValueError(f"layer {layer!r} is not one of layers_ {list(self.layers_)}")
        i = self.layers_.index(layer)
        params = {k: v for k, v in self.get_params().items() if k != "layers"}
        single = LinearProbe(**{**params, "C": float(self.C_[i])})
        s = self._stacked()
        fitted = {n: None if s[n] is None else np.array(s[n][i : i + 1]) for n in _PER_LAYER}
        single._set_stacked({**fitted, "classes_": self.classes_.copy(), "Cs_": self.Cs_})
        return single


class LinearProbe(_LogisticProbes):
    """Binary L2-regularised logistic probe on one layer's activations X ``[n, d]``; a
    scikit-learn estimator (the one-layer view of :class:`LayerProbes`).

    The objective is ``LogisticRegression(C=C)``'s on standardised features (see the module
    docstring); ``C=None`` chooses C by ``cv``-fold cross-validated accuracy over ``Cs``
    (grouped when ``fit`` gets ``groups``, else stratified). Works with ``clone``,
    ``cross_val_score``, ``Pipeline`` and ``GridSearchCV``.

    Fitted attributes: ``coef_ [1, d]`` and ``intercept_ [1]`` in the original input space,
    ``classes_ [2]``, ``C_`` (a float), ``mean_ [d]``, ``scale_ [d]``, ``n_features_in_``,
    ``n_iter_ [1]``, and ``Cs_`` and ``cv_scores_ [len(Cs_)]`` when C was chosen by
    cross-validation (None otherwise).

    >>> import numpy as np
    >>> from sklearn.model_selection import cross_val_score
    >>> rng = np.random.default_rng(0)
    >>> y = np.array(["comply", "refuse"] * 50)
    >>> X = rng.standard_normal((100, 8)) + 2.0 * (y == "refuse")[:, None]
    >>> probe = LinearProbe(Cs=(0.01, 1.0), cv=3).fit(X, y)
    >>> probe.classes_.tolist(), probe.coef_.shape, probe.C_ in (0.01, 1.0)
    (['comply', 'refuse'], (1, 8), True)
    >>> bool(cross_val_score(LinearProbe(C=1.0), X, y, cv=3).min() > 0.9)
    True
    """

    def __init__(
        self,
        C: float | None = None,
        Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 5,
        standardize: bool = True,
        max_iter: int = 100,
        tol: float = 1e-5,
        random_state: int = 0,
        rank: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.rank = rank
        self.device = device
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def _layers_of(self, X, *, fitting: bool = False) -> torch.Tensor:
        if not fitting:
            self._check_fitted()
        x = _as_tensor(X, "X", (0, 1, 2, 3), check_finite=False)
        if x.ndim == 3:
            raise ValueError(
                f"X must be 2-D [n, d]; got shape {tuple(x.shape)}; for [n, n_layers, d] use "
                "fit_layer_probes or LayerProbes"
            )
        if x.ndim != 2:
            raise ValueError(
                f"X must be 2-D [n, d]; got shape {tuple(x.shape)}. Reshape your data: "
                "X.reshape(-1, 1) for one feature, X.reshape(1, -1) for one sample"
            )
        if fitting and (x.shape[1] == 0 or x.shape[0] == 0):
            what = "feature" if x.shape[1] == 0 else "sample"
            raise ValueError(
                f"X has 0 {what}(s) (shape={tuple(x.shape)}) while a minimum of 1 is required."
            )
        if not fitting and x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features, but LinearProbe is expecting "
                f"{self.n_features_in_} features as input (got shape {tuple(x.shape)})"
            )
        return x[:, None, :]

    def _unstack(self, out: np.ndarray) -> np.ndarray:
        return out[:, 0]

    def _stacked(self) -> dict:
        cv_scores = getattr(self, "cv_scores_", None)
        return {
            "coef_": self.coef_,
            "intercept_": self.intercept_,
            "C_": np.array([self.C_], dtype=np.float64),
            "mean_": self.mean_[None],
            "scale_": self.scale_[None],
            "n_iter_": np.asarray(self.n_iter_),
            "cv_scores_": None if cv_scores is None else np.asarray(cv_scores)[None],
            "classes_": self.classes_,
            "Cs_": getattr(self, "Cs_", None),
        }

    def _set_stacked(self, fitted: dict) -> None:
        self.coef_ = fitted["coef_"]
        self.intercept_ = fitted["intercept_"]
        self.classes_ = fitted["classes_"]
        self.C_ = float(fitted["C_"][0])
        self.mean_ = fitted["mean_"][0]
        self.scale_ = fitted["scale_"][0]
        self.n_iter_ = fitted["n_iter_"]
        self.n_features_in_ = self.coef_.shape[1]
        cv_scores = fitted["cv_scores_"]
        self.cv_scores_ = None if cv_scores is None else cv_scores[0]
        self.Cs_ = fitted["Cs_"]


def fit_layer_probes(
    X,
    y,
    C: float | Sequence[float] | None = 1.0,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 5,
    groups=None,
    standardize: bool = True,
    max_iter: int = 100,
    tol: float = 1e-5,
    rank: int = 64,
    layers: Sequence | None = None,
    random_state: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LayerProbes:
    """``LayerProbes(C, Cs=..., ...).fit(X, y, groups=groups)``: a fitted :class:`LayerProbes`
    (see it for the arguments). X ``[n, n_layers, d]``, y ``[n]``, groups ``[n]`` or None.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(200) % 2
    >>> X = rng.standard_normal((200, 3, 16)).astype(np.float32)  # [n, n_layers, d]
    >>> X[:, 2, 0] += 3 * y  # only layer 2 carries the label
    >>> probes = fit_layer_probes(X, y, C=1.0)
    >>> probes.coef_.shape, probes.intercept_.shape
    ((3, 16), (3,))
    >>> [bool(acc > 0.9) for acc in probes.score_layers(X, y)]
    [False, False, True]
    >>> probes.probe(2).predict(X[:4, 2]).tolist()
    [0, 1, 0, 1]
    """
    estimator = LayerProbes(
        C,
        Cs=Cs,
        cv=cv,
        standardize=standardize,
        max_iter=max_iter,
        tol=tol,
        rank=rank,
        layers=layers,
        random_state=random_state,
        device=device,
        dtype=dtype,
    )
    return estimator.fit(X, y, groups=groups)
