"""Bad calls fail early with messages that name the parameter and echo the value."""

from __future__ import annotations

import numpy as np
import pytest

import daskpatch as dp

VOL = np.zeros((16, 16, 16), np.float32)
P = dp.extract_patches(VOL, 8)


def ident(b):
    return b


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: dp.extract_patches("volume", 8), TypeError,
         r"volume must be a NumPy, Dask or Zarr array; got 'volume' of type str"),
        (lambda: dp.extract_patches(VOL, 8.0), TypeError,
         r"size must be an integer or a sequence of integers; got 8\.0 of type float"),
        (lambda: dp.extract_patches(VOL, 0), ValueError, r"size must be >= 1 on every axis; got \(0, 0, 0\)"),
        (lambda: dp.extract_patches(VOL, -2), ValueError, r"size must be >= 1"),
        (lambda: dp.extract_patches(VOL, 32), ValueError,
         r"size \(32, 32, 32\) is larger than the volume shape \(16, 16, 16\).*border='pad'"),
        (lambda: dp.extract_patches(VOL, 8, 0), ValueError, r"stride must be >= 1 on every axis; got \(0, 0, 0\)"),
        (lambda: dp.extract_patches(VOL, 8, (4, 4)), ValueError,
         r"stride must be an integer or a sequence of 3 integers .* got \(4, 4\) with 2 entries"),
        (lambda: dp.extract_patches(VOL, (8, 8, 8, 8)), ValueError,
         r"size has 4 entries but the 3-D volume has 3 non-channel axes"),
        (lambda: dp.extract_patches(VOL, 8, border="mirror"), ValueError,
         r"border must be one of \('shift', 'pad', 'drop'\); got 'mirror'"),
        (lambda: dp.extract_patches(VOL, 8, border="pad", pad_mode="nearest"), ValueError,
         r"pad_mode must be one of \('reflect', 'symmetric', 'edge', 'wrap', 'constant'\); got 'nearest'"),
        (lambda: dp.extract_patches(VOL, 8, channel_axis=3), ValueError,
         r"channel_axis must be None or an axis of the 3-D volume \(from -3 to 2\); got 3"),
        (lambda: dp.extract_patches(VOL, 8, channel_axis="last"), TypeError,
         r"channel_axis must be an integer; got 'last' of type str"),
        (lambda: dp.extract_patches(np.zeros((8, 2, 8)), (8, 8), channel_axis=1), ValueError,
         r"channel_axis must come before the spatial axes or be the last axis"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, blend="smooth"), ValueError,
         r"blend must be one of \('constant', 'gaussian', 'hann', 'triangular', 'crop'\), an array .* got 'smooth'"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, blend=3), TypeError,
         r"blend must be one of .* got 3 of type int"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, blend=np.ones((4, 4, 4))), ValueError,
         r"blend must have the patch shape \(8, 8, 8\); got shape \(4, 4, 4\)"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, blend=np.zeros((8, 8, 8))), ValueError,
         r"blend must be positive and finite everywhere .* minimum is 0\.0"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, sigma_scale=0), ValueError,
         r"sigma_scale must be a positive finite number; got 0"),
        (lambda: dp.reconstruct(P, (16, 16, 17), 8), ValueError,
         r"patches must have shape \(12, 8, 8, 8\) for shape=\(16, 16, 17\).* got \(8, 8, 8, 8\)"),
        (lambda: dp.reconstruct([[1]], (16, 16, 16), 8), TypeError,
         r"patches must be a NumPy, Dask or Zarr array; got \[\[1\]\] of type list"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, block_shape=12), ValueError,
         r"block_shape must be a multiple of the stride \(8, 8, 8\) on every axis; got \(12, 12, 12\)"),
        (lambda: dp.reconstruct(P, (16, 16, 16), 8, fill_value="zero"), TypeError,
         r"fill_value must be a number or None; got 'zero' of type str"),
        (lambda: dp.apply_patches(VOL, "model", 8), TypeError,
         r"fn must be a callable taking a batch of patches; got 'model' of type str"),
        (lambda: dp.apply_patches(VOL, ident, 8, batch_size=0), ValueError, r"batch_size must be >= 1; got 0"),
        (lambda: dp.apply_patches(VOL, ident, 8, batch_size=2.0), TypeError,
         r"batch_size must be an integer; got 2\.0 of type float"),
        (lambda: dp.apply_patches(VOL, ident, 8, out_channels=0), ValueError,
         r"out_channels must be >= 1; got 0"),
        (lambda: dp.apply_patches(VOL, ident, 8, dtype="floaty"), TypeError,
         r"dtype must be a NumPy dtype; got 'floaty' of type str"),
        (lambda: dp.apply_patches(VOL, ident, 8, spill=3), TypeError,
         r"spill must be None, False, True, a directory path \(str or os.PathLike\) or a zarr "
         r"store; got 3 of type int"),
        (lambda: dp.get_patches(np.zeros((8, 8)), 4), ValueError,
         r"img_arr must be a 3-D volume \(X, Y, Z\) or a stack \(B, X, Y, Z\); got 2-D shape \(8, 8\)"),
        (lambda: dp.reconstruct_patch(np.zeros((3, 4, 4, 4, 1)), (8, 8, 8), 4, 4), ValueError,
         r"img_arr holds 3 patches, not a whole number of volumes of 8 patches each"),
    ],
)
def test_error_table(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
