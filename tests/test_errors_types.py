"""The error table by class: each bad call raises its daskpatch.errors class, still an instance
of the built-in it replaces, carrying the parameter at fault and its value (the message as
before)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import errors as E
from daskpatch.cli.errors import in_flags

VOL = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)


def _resume_other_stride(tmp: str) -> None:
    dp.to_zarr(dp.apply_patches(VOL, lambda b: b, 8, 4), f"{tmp}/r.zarr")
    dp.to_zarr(dp.apply_patches(VOL, lambda b: b, 8, 8), f"{tmp}/r.zarr", resume=True)


def _overwrite_group(tmp: str) -> None:
    zarr.open_group(f"{tmp}/g.zarr", mode="w").create_array("a", shape=(4,), dtype="f4")
    dp.to_zarr(VOL, f"{tmp}/g.zarr", overwrite=True)


def _write_what_is_read(tmp: str) -> None:
    dp.to_zarr(VOL, f"{tmp}/v.zarr")
    volume = dp.open_volume(f"{tmp}/v.zarr")
    dp.to_zarr(dp.apply_patches(volume, lambda b: b, 8, 4), f"{tmp}/v.zarr", overwrite=True)


def _exists(tmp: str) -> None:
    dp.to_zarr(VOL, f"{tmp}/v.zarr")
    dp.to_zarr(VOL, f"{tmp}/v.zarr")


def _open_incomplete_ome(tmp: str) -> None:
    dp.to_zarr(VOL, f"{tmp}/img.zarr", ome=True, compute=False)  # the group, no levels yet
    dp.open_volume(f"{tmp}/img.zarr")


def _open_group(tmp: str) -> None:
    zarr.open_group(f"{tmp}/g.zarr", mode="w").create_array("a", shape=(4,), dtype="f4")
    dp.open_volume(f"{tmp}/g.zarr")


def _wrong_shape(tmp: str) -> None:
    dp.apply_patches(VOL, lambda b: b[..., :4], 8, 4).compute()


def _not_numbers(tmp: str) -> None:
    dp.apply_patches(VOL, lambda b: b.astype(str), 8, 4).compute()


CASES = [  # (id, call, class, built-in, attributes, match)
    ("resume another stride", _resume_other_stride, E.ResumeMismatchError, ValueError,
     {"param": "stride", "stored": [4, 4, 4], "value": [8, 8, 8], "given": [8, 8, 8]},
     r"resume=True: the root of store '.*r\.zarr' was written with stride=\(4, 4, 4\), but "
     r"this call has stride=\(8, 8, 8\)"),
    ("overwrite a group", _overwrite_group, E.UnsafeTargetError, ValueError,
     {"param": "path"}, r"g\.zarr' is a group; to_zarr never replaces a group"),
    ("write what the graph reads", _write_what_is_read, E.UnsafeTargetError, ValueError,
     {"param": "store"}, r"to_zarr: the input array reads from the root of store '.*v\.zarr'"),
    ("array exists", _exists, E.TargetExistsError, FileExistsError,
     {"param": "overwrite"}, r"to_zarr: an array already exists at the root of store"),
    ("open an incomplete OME image", _open_incomplete_ome, E.IncompleteOutputError, ValueError,
     {"param": None}, r"is an incomplete OME-Zarr image written by daskpatch"),
    ("open a group", _open_group, E.ParameterError, ValueError,
     {"param": "path", "value": None, "expected": ["a"]},
     r"store/path must name a Zarr array, but the root of store '.*g\.zarr' holds a group; "
     r"pass path= one of \['a'\]"),
    ("uncovered voxels", lambda tmp: dp.apply_patches(VOL, lambda b: b, 6, 6, border="drop"),
     E.UncoveredVoxelsError, ValueError,
     {"param": "fill_value", "uncovered": 16 ** 3 - 12 ** 3, "total": 16 ** 3},
     r"the patch grid leaves 2368 of 4096 voxels uncovered .* pass fill_value=\.\.\."),
    ("fill_value not a number",
     lambda tmp: dp.apply_patches(VOL, lambda b: b, 6, 6, border="drop", fill_value="x"),
     E.ParameterTypeError, TypeError, {"param": "fill_value", "value": "x"},
     r"fill_value must be a number or None; got 'x' of type str"),
    ("fill_value does not fit",
     lambda tmp: dp.apply_patches(VOL, lambda b: b, 6, 6, border="drop", fill_value=300,
                                  dtype="uint8"),
     E.ParameterError, ValueError, {"param": "fill_value", "value": 300},
     r"fill_value=300 does not fit the result dtype uint8"),
    ("model returns the wrong shape", _wrong_shape, E.ModelOutputError, ValueError,
     {"param": "fn", "expected": (1, 8, 8, 8), "got": (1, 8, 8, 4)},
     r"fn returned shape \(1, 8, 8, 4\) for a batch of shape \(1, 8, 8, 8\); expected "
     r"\(1, 8, 8, 8\)"),
    ("model returns strings", _not_numbers, E.ModelOutputTypeError, TypeError,
     {"param": "fn", "expected": "a numeric dtype"},
     r"fn must return numbers \(a numeric dtype\)"),
    ("size of the wrong type", lambda tmp: dp.apply_patches(VOL, lambda b: b, size="a"),
     E.ParameterTypeError, TypeError, {"param": "size", "value": "a"},
     r"size must be an integer or a sequence of integers; got 'a' of type str"),
    ("size too small", lambda tmp: dp.extract_patches(VOL, (8, 0, 8)),
     E.ParameterError, ValueError, {"param": "size", "value": (8, 0, 8)},
     r"size must be >= 1 on every axis; got \(8, 0, 8\) \(axis 1 is 0\)"),
    ("pad_mode unknown", lambda tmp: dp.extract_patches(VOL, 8, pad_mode="nearest"),
     E.ParameterError, ValueError, {"param": "pad_mode", "value": "nearest"},
     r"pad_mode must be one of \('reflect', 'symmetric', 'edge', 'wrap', 'constant'\)"),
]


@pytest.mark.parametrize(("call", "cls", "builtin", "attrs", "match"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_class_and_attributes(tmp_path, call, cls, builtin, attrs, match):
    with pytest.raises(cls, match=match) as info:
        call(str(tmp_path))
    err = info.value
    assert type(err) is cls
    assert isinstance(err, builtin) and isinstance(err, E.DaskpatchError)
    for name, value in attrs.items():
        assert getattr(err, name) == value, name
    again = pickle.loads(pickle.dumps(err))  # errors travel from dask workers
    assert type(again) is cls and str(again) == str(err)
    assert {n: getattr(again, n) for n in attrs} == attrs


def test_every_class_is_its_builtin_and_ours():
    pairs = {E.ParameterError: ValueError, E.ParameterTypeError: TypeError,
             E.ResumeMismatchError: ValueError, E.UnsafeTargetError: ValueError,
             E.TargetExistsError: FileExistsError, E.TargetNotDeletableError: PermissionError,
             E.IncompleteOutputError: ValueError, E.UncoveredVoxelsError: ValueError,
             E.ModelOutputError: ValueError, E.ModelOutputTypeError: TypeError}
    assert set(pairs) | {E.DaskpatchError, E.IncompleteWarning} == \
        {getattr(E, n) for n in E.__all__}
    for cls, builtin in pairs.items():
        assert issubclass(cls, builtin) and issubclass(cls, E.DaskpatchError)
        err = cls("message", param="p") if "param" in cls.__init__.__code__.co_varnames \
            else cls("message")
        assert str(err) == "message" and err.args == ("message",)


def test_incomplete_warning_is_one_class_everywhere():
    from daskpatch.storage.stores import IncompleteWarning
    assert dp.IncompleteWarning is E.IncompleteWarning is IncompleteWarning


def test_cli_rewords_by_class_and_attribute():
    err = E.ParameterError("store/path must name a Zarr array, but path 'grp' of store 'g' "
                           "holds a group; pass path= one of ['a']", param="path",
                           mentions=("store/path",))
    assert in_flags(err, "apply") == ("SRC/--src-path must name a Zarr array, but path 'grp' "
                                      "of store 'g' holds a group; pass --src-path one of ['a']")
    target = E.UnsafeTargetError("to_zarr: 'o' is a group. Pass path= naming an array inside "
                                 "it", param="path")
    assert in_flags(target, "apply").endswith("Pass --dst-path naming an array inside it")
    # only the parameters the error names are respelled; other errors keep their words
    assert in_flags(E.ParameterError("channel_axis=1 with block_shape=4", param="block_shape"),
                    "apply") == "channel_axis=1 with --block-shape=4"
    assert in_flags(ValueError("fill_value=1"), "apply") == "fill_value=1"
