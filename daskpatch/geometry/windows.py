"""Blending windows and their exact normalisation.

Every built-in window is a product of 1-D profiles, and the patches of a :class:`PatchGrid` form a
Cartesian product of per-axis starts, so the normalising sum of all windows factorises:

    W(x) = prod_a W_a(x_a),    W_a(t) = sum_i p_a(t - s_{a,i})

Each 1-D profile is therefore divided by its own axis sum *before* the patches are combined: patch
``i`` contributes ``prod_a q_a[i_a](x_a - s_{a,i})`` with ``q = p / W_a``, and those weights add up
to one wherever a patch covers. Nothing is divided by a small or zero number at the volume's
borders (tiler's hann gives an error of 1.0 there), nothing is clamped (MONAI and nnU-Net clamp
gaussian weights to 1e-3 of the peak), and nothing of volume size is ever built. The gaussian is
normalised in log space, so even ``sigma_scale=1e-3`` (a profile that is 0 in float64 a few voxels
off its centre) gives weights that add up to one, with no 0/0.

All profiles are strictly positive (``hann`` and ``triangular`` are sampled at voxel centres), so a
voxel is weighted wherever a patch covers it. ``"crop"`` takes each voxel from the patch whose centre
is nearest — the ``map_overlap`` trim rule — which per axis is a partition, hence separable too.

A user window (an array of patch shape, or a callable returning one) need not be separable; the
engine then accumulates the weights beside the data and divides once per voxel. It must be
positive and finite; it is scaled (:meth:`Window.scaled`) so that its weights covering a voxel add
up to at most one, whatever the scale of the user's numbers (1e38 or 1e-45).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import numpy.typing as npt

from daskpatch.errors import ParameterError, ParameterTypeError
from daskpatch.geometry.parse import _describe

__all__ = ["BLENDS", "Blend", "profile", "window"]

BLENDS: tuple[str, ...] = ("constant", "gaussian", "hann", "triangular", "crop")
Blend = Union[Literal["constant", "gaussian", "hann", "triangular", "crop"], np.ndarray,
              Callable[[tuple[int, ...]], npt.ArrayLike]]


def profile(blend: str, n: int, sigma_scale: float = 0.125) -> np.ndarray:
    """The 1-D profile of a built-in window over ``n`` voxels (float64, peak 1, all positive).

    Examples
    --------
    >>> profile("triangular", 4).round(3).tolist()
    [0.333, 1.0, 1.0, 0.333]
    >>> profile("hann", 4).round(3).tolist()
    [0.172, 1.0, 1.0, 0.172]
    >>> bool(profile("gaussian", 128)[0] > 0)
    True
    """
    k = np.arange(n, dtype=np.float64)
    if blend in ("constant", "crop"):
        return np.ones(n)
    p: np.ndarray
    if blend == "gaussian":
        p = np.exp(_gaussian_log(n, sigma_scale))
    elif blend == "hann":
        p = np.sin(np.pi * (k + 0.5) / n) ** 2
    elif blend == "triangular":
        p = 1.0 - np.abs(2.0 * (k + 0.5) / n - 1.0)
    else:  # pragma: no cover - parse_blend rejects it first
        raise ValueError(f"blend must be one of {BLENDS}; got {blend!r}")
    peak: np.float64 = p.max()
    out: np.ndarray = p / peak
    return out


def window(blend: str, size: tuple[int, ...],
           sigma_scale: float | tuple[float, ...] = 0.125,
           min_weight: float | None = None) -> np.ndarray:
    """The full N-D window of a built-in blend: the outer product of its 1-D profiles.

    This is the raw window (peak 1), before the exact normalisation that
    :func:`~daskpatch.reconstruct` and :func:`~daskpatch.apply_patches` apply per axis (see
    :func:`~daskpatch.plot_window` for the normalised weights).

    Parameters
    ----------
    blend : {"constant", "gaussian", "hann", "triangular", "crop"}
        A built-in blend name (:data:`BLENDS`). ``"crop"`` is all ones here: which patch owns a
        voxel depends on the grid, not on the window.
    size : tuple of int
        Patch shape.
    sigma_scale : float or tuple of float
        Gaussian sigma as a fraction of the patch size (nnU-Net's and MONAI's 0.125 by default);
        a tuple gives one per axis. Ignored by the other blends.
    min_weight : float, optional
        Weights below ``min_weight`` times the window's peak are raised to it (then the peak is
        1 again). For ``"gaussian"`` the peak is that of the continuous gaussian, at the patch's
        centre point, which a patch of even size does not sample (its largest sample is a
        little below): ``1e-3`` is then exactly the window of MONAI's
        ``sliding_window_inference(mode="gaussian")``, which clamps its unnormalised gaussian at
        ``1e-3``.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``size``, all values in (0, 1].

    Examples
    --------
    >>> window("triangular", (2, 4)).round(3).tolist()
    [[0.333, 1.0, 1.0, 0.333], [0.333, 1.0, 1.0, 0.333]]
    >>> w = window("gaussian", (32, 32), sigma_scale=(0.125, 0.5))   # wider along axis 1
    >>> bool(w[0, 16] < w[16, 0])
    True
    """
    size = tuple(size)
    parsed = parse_blend(blend, size, sigma_scale) if isinstance(blend, str) else None
    if parsed is None:
        raise TypeError(f"blend must be one of {BLENDS}; got {_describe(blend)}")
    out = np.ones(())
    for a, n in enumerate(size):
        out = np.multiply.outer(out, profile(blend, n, parsed.sigma(a)))
    if min_weight is not None:
        if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) or \
                not 0 < min_weight <= 1:
            raise ParameterError(f"min_weight must be a number in (0, 1] or None; got "
                                 f"{_describe(min_weight)}", param="min_weight",
                                 value=min_weight)
        floor = float(min_weight)
        if blend == "gaussian":  # relative to the continuous gaussian's peak, as MONAI clamps
            floor /= math.prod(math.exp(float(_gaussian_log(n, parsed.sigma(a)).max()))
                               for a, n in enumerate(size))
        out = np.maximum(out, floor)
    return out


@dataclass(frozen=True)
class Window:
    """A parsed blend: a built-in separable window or a user array."""

    blend: str  # a built-in name, or "user"
    sigma_scale: float | tuple[float, ...]  # one for all axes, or one per axis
    array: np.ndarray | None = None  # user window, patch shape, float64
    source: str = "blend"  # how error messages name a user window

    def scaled(self, cover: int, dtype: Any) -> Window:
        """A user window scaled for accumulation in ``dtype`` where at most ``cover`` patches
        overlap a voxel: divided by its largest weight times ``cover``, so the weights covering
        any voxel add up to at most one (a weighted sum never overflows, however large or small
        the user's numbers), with its smallest weight still a normal ``dtype`` number (else the
        weight sum of a voxel could underflow to zero, or lose its precision).
        """
        if self.array is None:
            return self
        top = float(self.array.max())
        ratio = float(self.array.min()) / top
        tiny = float(np.finfo(dtype).tiny)
        if ratio / cover < tiny:
            raise ValueError(
                f"{self.source} has a smallest weight {ratio:.3g} times its largest; "
                f"{np.dtype(dtype)} accumulation needs at least {tiny * cover:.3g} (up to "
                f"{cover} patches overlap a voxel, and their weights, scaled to add up to at "
                "most 1, must stay normal numbers): raise its smallest weights"
            )
        return Window("user", self.sigma_scale, self.array / top / cover, self.source)

    @property
    def separable(self) -> bool:
        return self.array is None

    def sigma(self, axis: int | None) -> float:
        """The gaussian ``sigma_scale`` of ``axis``."""
        if isinstance(self.sigma_scale, tuple):
            if axis is None:
                raise ValueError("a per-axis sigma_scale needs the axis")  # internal misuse
            return self.sigma_scale[axis]
        return self.sigma_scale

    def axis_weights(self, starts: np.ndarray, size: int, extent: int,
                     axis: int | None = None) -> np.ndarray:
        """Normalised per-patch 1-D weights ``q`` (n_starts, size) along one axis.

        ``extent`` is the length the patches reach (the padded length); ``axis`` picks the
        sigma of a per-axis ``sigma_scale``. Summed over the patches covering a voxel, the
        weights give exactly one (float rounding aside).
        """
        starts = np.asarray(starts, dtype=np.int64)
        pos = starts[:, None] + np.arange(size)[None, :]
        if self.blend == "crop":
            centres = starts + (size - 1) / 2.0
            t = np.arange(extent, dtype=np.float64)
            j = np.clip(np.searchsorted(centres, t), 1, max(len(centres) - 1, 1))
            left = np.clip(j - 1, 0, len(centres) - 1)
            right = np.clip(j, 0, len(centres) - 1)
            nearest = np.where(np.abs(t - centres[left]) <= np.abs(t - centres[right]), left, right)
            owner: npt.NDArray[np.bool_] = nearest[pos] == np.arange(len(starts))[:, None]
            return owner.astype(np.float64)
        if self.blend == "gaussian":
            return _log_normalised(_gaussian_log(size, self.sigma(axis)), pos, extent)
        p = profile(self.blend, size, self.sigma(axis)) if self.array is None else np.ones(size)
        total = np.zeros(extent, dtype=np.float64)
        np.add.at(total, pos, np.broadcast_to(p, pos.shape))
        return p[None, :] / total[pos]


#: The narrowest gaussian (sigma in voxels) the windows compute with. Below it the blending
#: weights no longer change in float64: two patch centres at different distances from a voxel
#: differ by at least 0.25 / sigma^2 = 250000 in log weight, far past exp's underflow (745), so
#: each voxel already goes to its nearest centre (ties shared). Any smaller positive sigma_scale
#: gives these same weights instead of overflowing to ``-inf`` logs (0/0, NaN).
MIN_SIGMA = 1e-3


def _gaussian_log(n: int, sigma_scale: float) -> np.ndarray:
    """The natural log of the gaussian profile over ``n`` voxels (peak 0; finite)."""
    k = np.arange(n, dtype=np.float64)
    sigma = max(sigma_scale * n, MIN_SIGMA)
    return -0.5 * ((k - (n - 1) / 2) / sigma) ** 2


def _log_normalised(log_p: np.ndarray, pos: np.ndarray, extent: int) -> np.ndarray:
    """Weights ``p_i(t) / sum_j p_j(t)`` over the patches ``j`` covering ``t``, from ``log p``.

    Computed as ``exp(l_i - m) / sum_j exp(l_j - m)`` with ``m(t) = max_j l_j(t)``: the largest
    term is exactly 1, so the sum is at least 1 and nothing divides by zero, however small the
    profile gets (a gaussian with ``sigma_scale=1e-3`` is 0 in float64 a few voxels off its
    centre); a weight underflows to 0 only where its exact value is below 1e-308.
    """
    logs = np.broadcast_to(log_p, pos.shape)
    peak = np.full(extent, -np.inf)
    np.maximum.at(peak, pos, logs)
    rel = np.exp(logs - peak[pos])
    total = np.zeros(extent, dtype=np.float64)
    np.add.at(total, pos, rel)
    weights: np.ndarray = rel / total[pos]
    return weights


def _parse_sigma(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterTypeError(f"{name} must be a positive number; got {_describe(value)}",
                                 param=name, value=value, expected="a positive number")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ParameterError(f"{name} must be a positive finite number; got {value}",
                             param=name, value=value, expected="a positive finite number")
    return v


def parse_sigma_scale(sigma_scale: Any, ndim: int) -> float | tuple[float, ...]:
    """A positive number, or a sequence of one per spatial axis (a tuple of floats)."""
    if isinstance(sigma_scale, Sequence) and not isinstance(sigma_scale, (str, bytes)):
        if len(sigma_scale) != ndim:
            raise ParameterError(
                f"sigma_scale must be a number or a sequence of {ndim} numbers (one per spatial "
                f"axis); got {tuple(sigma_scale)!r} with {len(sigma_scale)} entries",
                param="sigma_scale", value=sigma_scale, expected=f"{ndim} entries"
            )
        return tuple(_parse_sigma(v, f"sigma_scale[{i}]") for i, v in enumerate(sigma_scale))
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, numbers.Real):
        raise ParameterTypeError(f"sigma_scale must be a positive number or a sequence of {ndim} "
                                 f"(one per spatial axis); got {_describe(sigma_scale)}",
                                 param="sigma_scale", value=sigma_scale)
    return _parse_sigma(sigma_scale, "sigma_scale")


def parse_blend(blend: Any, size: tuple[int, ...], sigma_scale: Any = 0.125) -> Window:
    """Check a ``blend`` argument against the patch ``size`` and return a :class:`Window`."""
    sigma_scale = parse_sigma_scale(sigma_scale, len(size))
    if isinstance(blend, str):
        if blend not in BLENDS:
            raise ValueError(
                f"blend must be one of {BLENDS}, an array of patch shape or a callable; "
                f"got {blend!r}"
            )
        return Window(blend, sigma_scale)
    if callable(blend):
        arr = blend(tuple(size))
        what = f"the window returned by blend={blend!r}"
    elif isinstance(blend, np.ndarray):
        arr, what = blend, "blend"
    else:
        raise TypeError(
            f"blend must be one of {BLENDS}, an array of patch shape or a callable; "
            f"got {_describe(blend)}"
        )
    arr = np.asarray(arr, dtype=np.float64)
    if arr.shape != tuple(size):
        raise ValueError(f"{what} must have the patch shape {tuple(size)}; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError(
            f"{what} must be positive and finite everywhere (a zero weight would leave covered "
            f"voxels without weight); {_first_bad(arr)}"
        )
    return Window("user", sigma_scale, arr, what)


def _first_bad(arr: np.ndarray) -> str:
    """Where a user window first fails to be positive and finite, for an error message."""
    bad = ~(np.isfinite(arr) & (arr > 0))
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape))
    finite = arr[np.isfinite(arr)]
    low = f"its minimum is {finite.min()}" if finite.size else "it has no finite value"
    return f"{low}; the first bad weight is {arr[where]} at {where}"
