"""Imaging formats: OME-Zarr in and out, outputs other readers open, recipes.

Independent implementations are the oracles: ome-zarr-py writes the inputs and reads the
outputs, ome-zarr-models validates them, tensorstore (a second Zarr v3 implementation) reads
every output, and NumPy computes the expected pyramid levels.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
import zarr.storage

import daskpatch as dp

xr = pytest.importorskip("xarray")
ts = pytest.importorskip("tensorstore")
ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")
ome_io = pytest.importorskip("ome_zarr.io")
ome_reader = pytest.importorskip("ome_zarr.reader")
models05 = pytest.importorskip("ome_zarr_models.v05.image")

SCALE = {"z": 2.0, "y": 0.5, "x": 0.5}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _ome_zarr_py_image(path: Path, data: np.ndarray, version: str) -> None:
    """An image written by ome-zarr-py itself: 2 levels (y, x halved), anisotropic scale."""
    fmt = ome_format.FormatV04() if version == "0.4" else ome_format.FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    ome_writer.write_image(
        data, group, fmt=fmt, axes="zyx", scale=SCALE, scale_factors=[{"z": 1, "y": 2, "x": 2}],
        axes_units=dict.fromkeys("zyx", "micrometer"),
        storage_options={"chunks": (4, 8, 8)},
    )


def _refuse(*args, **kwargs):
    raise AssertionError("a graph was computed while it was being built")


def _ts_read(path: Path) -> np.ndarray:
    """Read a Zarr v3 array with tensorstore (raises if it cannot)."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return np.asarray(ts.open(spec, read=True).result().read().result())


def _read_ome(path: Path) -> tuple[list[np.ndarray], dict]:
    """ome-zarr-py's reader: the level arrays and the multiscale metadata."""
    nodes = list(ome_reader.Reader(ome_io.parse_url(str(path)))())
    assert nodes, f"ome-zarr-py found no image at {path}"
    return [np.asarray(d) for d in nodes[0].data], nodes[0].metadata


def _multiscale(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]


def _block_mean(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """NumPy oracle of one level: edge-pad odd axes, then the mean of each box."""
    pad = [(0, -n % f) for n, f in zip(a.shape, factors)]
    a = np.pad(a, pad, mode="edge").astype(np.float64)
    for ax, f in enumerate(factors):
        shape = a.shape[:ax] + (a.shape[ax] // f, f) + a.shape[ax + 1:]
        a = a.reshape(shape).mean(axis=ax + 1)
    return a


def _block_mode(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """NumPy oracle: the most frequent value of each box, the smallest on a tie (a plain loop)."""
    pad = [(0, -n % f) for n, f in zip(a.shape, factors)]
    a = np.pad(a, pad, mode="edge")
    out = np.empty(tuple(n // f for n, f in zip(a.shape, factors)), dtype=a.dtype)
    for idx in np.ndindex(*out.shape):
        box = a[tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factors))].ravel()
        values, counts = np.unique(box, return_counts=True)
        out[idx] = values[np.argmax(counts)]
    return out


class FlakyStore(zarr.storage.WrapperStore):
    """A local store whose writes of chunks under ``fail_prefix`` fail after ``allow`` of them:
    a crash in the middle of one level."""

    def __init__(self, store, fail_prefix: str | None = None, allow: int = 0) -> None:
        super().__init__(store)
        self.fail_prefix, self.allow = fail_prefix, allow

    def _with_store(self, store):
        return type(self)(store, self.fail_prefix, self.allow)

    async def set(self, key, value):
        if self.fail_prefix and key.startswith(self.fail_prefix):
            if self.allow <= 0:
                raise OSError(f"simulated crash writing {key}")
            self.allow -= 1
        return await self._store.set(key, value)


# --------------------------------------------------------------------------------------------
# OME-Zarr in
# --------------------------------------------------------------------------------------------


@pytest.mark.needs_dask("Array.chunksize (ome-zarr-py writer)")
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_open_volume_reads_ome_zarr_py_images(tmp_path, version):
    data = np.random.default_rng(0).random((8, 16, 24)).astype(np.float32)
    path = tmp_path / "img.zarr"
    _ome_zarr_py_image(path, data, version)
    with dask.config.set(scheduler=_refuse):  # opening reads metadata only
        _check_opened(path, data.shape)


def _check_opened(path: Path, shape: tuple[int, ...]) -> None:
    vol = dp.open_volume(path)  # level 0, lazily, at the path the metadata names ("s0")
    assert isinstance(vol, da.Array) and vol.shape == shape and vol.chunksize == (4, 8, 8)
    low = dp.open_volume(path, level=1, xarray=True)
    assert low.dims == ("z", "y", "x") and low.shape == (8, 8, 12)
    assert isinstance(low.data, da.Array)
    # coordinates: translation + scale * index, from the dataset transformations ome-zarr-py
    # wrote for level 1 (scale (2, 1, 1), translation (0, 0.25, 0.25))
    np.testing.assert_allclose(low.coords["z"].values, 2.0 * np.arange(8))
    np.testing.assert_allclose(low.coords["y"].values, 0.25 + 1.0 * np.arange(8))
    np.testing.assert_allclose(low.coords["x"].values, 0.25 + 1.0 * np.arange(12))
    assert low.coords["x"].attrs["units"] == "micrometer"
    assert [a["type"] for a in low.attrs["ome"]["axes"]] == ["space"] * 3
    assert low.attrs["ome"]["level"] == 1 and low.attrs["ome"]["path"] == "s1"
    full = dp.open_volume(path, xarray=True)
    np.testing.assert_allclose(full.coords["y"].values, 0.5 * np.arange(16))


@pytest.mark.needs_dask("Array.chunksize (ome-zarr-py writer)")
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_open_volume_levels_hold_the_written_data(tmp_path, version):
    data = np.random.default_rng(1).random((8, 16, 24)).astype(np.float32)
    path = tmp_path / "img.zarr"
    _ome_zarr_py_image(path, data, version)
    np.testing.assert_array_equal(dp.open_volume(path).compute(), data)
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(dp.open_volume(path, level=1).compute(), group["s1"][...])


@pytest.mark.needs_dask("Array.chunksize (ome-zarr-py writer)")
def test_open_volume_bad_level_lists_the_levels(tmp_path):
    path = tmp_path / "img.zarr"
    _ome_zarr_py_image(path, np.zeros((4, 8, 8), np.float32), "0.5")
    with pytest.raises(ValueError, match=r"level must be one of the 2 levels .*'s0', 's1'.*got 2"):
        dp.open_volume(path, level=2)
    with pytest.raises(TypeError, match="level must be an integer; got '1' of type str"):
        dp.open_volume(path, level="1")
    with pytest.raises(ValueError, match="level must be >= 0; got -1"):
        dp.open_volume(path, level=-1)


def test_open_volume_plain_arrays_and_dimension_names(tmp_path):
    z = zarr.create_array(str(tmp_path / "named.zarr"), shape=(4, 6), chunks=(2, 3), dtype="u1",
                          dimension_names=("y", "x"), attributes={"note": "hi"})
    z[...] = 7
    named = dp.open_volume(tmp_path / "named.zarr", xarray=True)
    assert named.dims == ("y", "x") and named.attrs == {"note": "hi"} and not named.coords
    zarr.create_array(str(tmp_path / "bare.zarr"), shape=(4, 6, 2), dtype="f4")
    assert dp.open_volume(tmp_path / "bare.zarr", xarray=True).dims == ("dim_0", "dim_1", "dim_2")
    with pytest.raises(ValueError, match="level must be 0 for a plain Zarr array .*; got 1"):
        dp.open_volume(tmp_path / "bare.zarr", level=1)
    with pytest.raises(TypeError, match="xarray must be True or False; got 'yes'"):
        dp.open_volume(tmp_path / "bare.zarr", xarray="yes")


@pytest.mark.needs_dask("Array.chunksize (ome-zarr-py writer)")
def test_open_volume_bioformats2raw_layout(tmp_path):
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    data = np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8)
    fmt = ome_format.FormatV04()
    series = root.create_group("0")
    ome_writer.write_image(data, series, fmt=fmt, axes="zyx", scale_factors=[])
    np.testing.assert_array_equal(dp.open_volume(tmp_path / "b2r.zarr").compute(), data)


# --------------------------------------------------------------------------------------------
# OME-Zarr out
# --------------------------------------------------------------------------------------------


def _anisotropic(shape=(10, 36, 44), dtype=np.float32) -> xr.DataArray:
    rng = np.random.default_rng(3)
    data = (rng.random(shape) * 100).astype(dtype)
    coords = {d: xr.Variable(d, t + s * np.arange(n), attrs={"units": "micrometer"})
              for d, n, s, t in zip("zyx", shape, (2.0, 0.5, 0.5), (5.0, 0.0, -1.0))}
    return xr.DataArray(da.from_array(data, chunks=(5, 12, 11)), dims=("z", "y", "x"),
                        coords=coords, name="raw")


@pytest.mark.needs_dask("dask.array.from_zarr (ome-zarr-py reader)")
def test_ome_pyramid_read_by_ome_zarr_py_validated_and_read_by_tensorstore(tmp_path):
    vol = _anisotropic()
    pred = dp.apply_patches(vol, lambda b: b + 1, 8, 4, batch_size=4)  # a DataArray
    path = tmp_path / "pred.zarr"
    group = dp.to_zarr(pred, path, ome=True, levels=3)
    assert isinstance(group, zarr.Group)

    levels, meta = _read_ome(path)  # ome-zarr-py's own reader
    assert [a.shape for a in levels] == [(10, 36, 44), (5, 18, 22), (3, 9, 11)]
    assert [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in meta["axes"]} == {"micrometer"}
    models05.Image.from_zarr(zarr.open_group(str(path), mode="r"))  # raises if invalid

    level0 = dp.apply_patches(vol.data, lambda b: b + 1, 8, 4, batch_size=4).compute()
    np.testing.assert_array_equal(levels[0], level0)
    np.testing.assert_allclose(levels[1], _block_mean(level0, (2, 2, 2)), rtol=1e-6)
    np.testing.assert_allclose(levels[2], _block_mean(levels[1], (2, 2, 2)), rtol=1e-6)
    for k in range(3):  # an independent Zarr v3 implementation reads every level
        np.testing.assert_array_equal(_ts_read(path / str(k)), levels[k])

    multiscale = _multiscale(path)
    extents = []
    for ds, arr in zip(multiscale["datasets"], levels):
        scale = ds["coordinateTransformations"][0]["scale"]
        extents.append(np.array(arr.shape) * np.array(scale))
    for e in extents[1:]:  # every level covers the same physical extent
        np.testing.assert_allclose(e, extents[0], rtol=1e-12)
    np.testing.assert_allclose(extents[0], [20.0, 18.0, 22.0])
    # translation: voxel centres sit at the centres of their footprints, level 0 at coords[0]
    ds1 = multiscale["datasets"][1]["coordinateTransformations"]
    np.testing.assert_allclose(ds1[1]["translation"], [5.0 + 1.0, 0.25, -1.0 + 0.25])
    # and open_volume reads the coordinates back
    back = dp.open_volume(path, level=1, xarray=True)
    np.testing.assert_allclose(back.coords["z"].values, 6.0 + 4.0 * np.arange(5))
    np.testing.assert_allclose(dp.open_volume(path, xarray=True).coords["x"].values,
                               vol.coords["x"].values)


@pytest.mark.needs_dask("dask.array.from_zarr (ome-zarr-py reader)")
def test_ome_label_pyramid_uses_the_mode_and_keeps_ids(tmp_path):
    labels = np.random.default_rng(4).integers(0, 4, size=(7, 13, 9)).astype(np.uint16)
    path = tmp_path / "labels.zarr"
    dp.to_zarr(da.from_array(labels, chunks=(4, 5, 4)), path, ome=True, levels=3,
               scale=[1.0, 0.3, 0.3], units=["micrometer"] * 3)
    levels, _ = _read_ome(path)
    assert [a.shape for a in levels] == [(7, 13, 9), (4, 7, 5), (2, 4, 3)]
    np.testing.assert_array_equal(levels[1], _block_mode(labels, (2, 2, 2)))
    np.testing.assert_array_equal(levels[2], _block_mode(levels[1], (2, 2, 2)))
    assert levels[1].dtype == np.uint16
    models05.Image.from_zarr(zarr.open_group(str(path), mode="r"))
    ms = _multiscale(path)
    assert ms["type"] == "mode"
    shapes = [np.array(a.shape) for a in levels]
    for ds, shape in zip(ms["datasets"], shapes):
        np.testing.assert_allclose(shape * ds["coordinateTransformations"][0]["scale"],
                                   [7.0, 3.9, 2.7])


@pytest.mark.needs_dask("dask.array.from_zarr (ome-zarr-py reader)")
def test_ome_keeps_time_and_channel_axes_and_halves_only_long_space_axes(tmp_path):
    data = da.random.default_rng(5).random((2, 3, 1, 8, 6), chunks=(1, 3, 1, 4, 6))
    path = tmp_path / "tczyx.zarr"
    dp.to_zarr(data, path, ome=True, levels=4, downsample="mean",
               units={"t": "second", "x": "nanometer"})
    levels, meta = _read_ome(path)
    assert [a.shape for a in levels] == [(2, 3, 1, 8, 6), (2, 3, 1, 4, 3), (2, 3, 1, 2, 2),
                                         (2, 3, 1, 1, 1)]
    assert [a["type"] for a in meta["axes"]] == ["time", "channel", "space", "space", "space"]
    models05.Image.from_zarr(zarr.open_group(str(path), mode="r"))
    np.testing.assert_allclose(levels[1], _block_mean(data.compute(), (1, 1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"levels=5 is too many for shape \(2, 3, 1, 8, 6\): "
                                         r"level 3 \(2, 3, 1, 1, 1\) has no space axis left"):
        dp.to_zarr(data, tmp_path / "more.zarr", ome=True, levels=5)
    assert not (tmp_path / "more.zarr").exists()


@pytest.mark.needs_dask("dask.array.from_zarr (ome-zarr-py reader)")
def test_ome_compute_false_single_level(tmp_path):
    path = tmp_path / "lazy.zarr"
    job = dp.to_zarr(da.ones((4, 8, 8), chunks=4), path, ome=True, compute=False)
    # no OME metadata until the job has run
    assert not list(ome_reader.Reader(ome_io.parse_url(str(path)))())
    group = job.compute()
    assert _read_ome(path)[0][0].shape == (4, 8, 8) and isinstance(group, zarr.Group)


@pytest.mark.needs_dask("Array.__array__ (xarray .values)")
def test_plain_outputs_carry_dimension_names_and_read_in_tensorstore(tmp_path):
    vol = _anisotropic()
    out = dp.to_zarr(dp.apply_patches(vol, lambda b: -b, 8, 4), tmp_path / "plain.zarr")
    assert out.metadata.dimension_names == ("z", "y", "x")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "plain.zarr")}}
    store = ts.open(spec, read=True).result()
    assert [d.label for d in store.domain] == ["z", "y", "x"]
    np.testing.assert_array_equal(np.asarray(store.read().result()), out[...])
    np.testing.assert_allclose(out[...], -vol.values, rtol=1e-5, atol=1e-4)
    assert dp.open_volume(tmp_path / "plain.zarr", xarray=True).dims == ("z", "y", "x")


def test_interrupted_plain_output_still_reads_in_tensorstore(tmp_path, setting):
    """Per-chunk done-markers and spilled halo parts left by a crash, under the output array's
    prefix, stop neither tensorstore nor zarr from reading it."""
    setting("daskpatch.spill-bytes", 0)  # spill halos into the output store
    vol = np.random.default_rng(6).random((64, 64), dtype=np.float32)
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] > 30:
            raise RuntimeError("model crashed")
        return batch

    path = tmp_path / "partial.zarr"
    volume = dp.open_volume(dp.to_zarr(vol, tmp_path / "in.zarr", chunks=16))
    result = dp.apply_patches(volume, flaky, 16, 8, block_shape=16)
    with pytest.raises(RuntimeError, match="model crashed"), \
            dask.config.set(scheduler="synchronous"):
        dp.to_zarr(result, path, chunks=16)
    assert any((path / ".daskpatch-done" / "chunks").iterdir())
    assert any((path / ".daskpatch-spill").rglob("*"))
    got = _ts_read(path)  # chunks not written read as the fill value
    np.testing.assert_array_equal(got, zarr.open_array(str(path), mode="r")[...])
    assert np.count_nonzero(got) > 0 and np.count_nonzero(got == 0) > 0


@pytest.mark.needs_dask("dask.array.from_zarr (ome-zarr-py reader)")
def test_interrupted_pyramid_is_incomplete_and_resumes(tmp_path):
    data = np.random.default_rng(7).random((16, 24, 24)).astype(np.float32)
    x = da.from_array(data, chunks=8)
    local = zarr.storage.LocalStore(str(tmp_path / "img.zarr"))
    with pytest.raises(OSError, match="simulated crash writing 1/c"):
        dp.to_zarr(x, FlakyStore(local, "1/c", allow=2), ome=True, levels=3,
                   scale=(2.0, 1.0, 1.0))
    # recognisably incomplete: no OME metadata, named so by open_volume, unseen by ome-zarr-py
    with pytest.raises(ValueError, match="is an incomplete OME-Zarr image written by daskpatch"):
        dp.open_volume(tmp_path / "img.zarr")
    assert not list(ome_reader.Reader(ome_io.parse_url(str(tmp_path / "img.zarr")))())
    with pytest.raises(FileExistsError, match="an OME-Zarr image already exists"):
        dp.to_zarr(x, tmp_path / "img.zarr", ome=True, levels=3)
    with pytest.raises(ValueError, match="started with levels=3 \\(this write: levels=2\\)"):
        dp.to_zarr(x, tmp_path / "img.zarr", ome=True, levels=2, resume=True)
    with pytest.raises(ValueError, match="started with downsample='mean' \\(this write: "
                                         "downsample='mode'\\); its levels would mix both"):
        dp.to_zarr(x, tmp_path / "img.zarr", ome=True, levels=3, downsample="mode",
                   resume=True)

    level0_mtime = {p: p.stat().st_mtime_ns for p in (tmp_path / "img.zarr/0/c").rglob("*")
                    if p.is_file()}
    dp.to_zarr(x, tmp_path / "img.zarr", ome=True, levels=3, scale=(2.0, 1.0, 1.0),
               resume=True)
    assert level0_mtime == {p: p.stat().st_mtime_ns for p in level0_mtime}  # not rewritten
    dp.to_zarr(x, tmp_path / "fresh.zarr", ome=True, levels=3, scale=(2.0, 1.0, 1.0))
    resumed, fresh = _read_ome(tmp_path / "img.zarr")[0], _read_ome(tmp_path / "fresh.zarr")[0]
    for a, b in zip(resumed, fresh):
        np.testing.assert_array_equal(a, b)
    assert _multiscale(tmp_path / "img.zarr") == _multiscale(tmp_path / "fresh.zarr")
    models05.Image.from_zarr(zarr.open_group(str(tmp_path / "img.zarr"), mode="r"))


@pytest.mark.needs_dask("Array.chunksize (ome-zarr-py writer)")
def test_ome_overwrite_safety(tmp_path):
    x = da.ones((4, 8, 8), chunks=4, dtype=np.float32)
    foreign = tmp_path / "foreign.zarr"
    _ome_zarr_py_image(foreign, np.zeros((4, 8, 8), np.float32), "0.5")
    with pytest.raises(ValueError, match="is a group that daskpatch did not write"):
        dp.to_zarr(x, foreign, ome=True, overwrite=True)
    assert (foreign / "s0" / "zarr.json").exists()

    ours = tmp_path / "ours.zarr"
    dp.to_zarr(x, ours, ome=True, levels=2)
    dp.to_zarr(2 * x, ours, ome=True, overwrite=True)  # replaced: one level now
    assert [a.shape for a in _read_ome(ours)[0]] == [(4, 8, 8)] and not (ours / "1").exists()
    with pytest.raises(ValueError, match="the input array reads from"):
        dp.to_zarr(dp.open_volume(ours) + 1, ours, ome=True, overwrite=True)
    np.testing.assert_array_equal(dp.open_volume(ours).compute(), 2 * np.ones((4, 8, 8)))

    array = tmp_path / "array.zarr"
    dp.to_zarr(x, array)
    with pytest.raises(FileExistsError, match="an array already exists"):
        dp.to_zarr(x, array, ome=True)
    dp.to_zarr(x, array, ome=True, overwrite=True)  # an array may be replaced by an image
    assert [a.shape for a in _read_ome(array)[0]] == [(4, 8, 8)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"axes": "zy"}, ValueError, r"axes must have one entry per axis of the 3-D array; got "
                                     r"\['z', 'y'\] with 2 entries"),
        ({"axes": 3}, TypeError, "axes must be a string of one-letter names"),
        ({"axes": "yzc"}, ValueError, "2 or 3 space axes, last, after at most one channel"),
        ({"axes": "zzx"}, ValueError, "axes must have distinct, non-empty names"),
        ({"axes": [{"name": "z", "type": "depth"}, "y", "x"]}, ValueError,
         "the type of axis 'z' must be one of \\('space', 'time', 'channel'\\); got 'depth'"),
        ({"scale": (1.0, 0.0, 1.0)}, ValueError, "scale must be positive and finite"),
        ({"scale": (1.0, 1.0)}, ValueError, "scale must have one entry per axis"),
        ({"scale": {"q": 1.0}}, ValueError, r"scale names axes \['q'\] that the array does not"),
        ({"scale": (1.0, "1", 1.0)}, TypeError, "scale\\['y'\\] must be a number or None"),
        ({"units": {"x": "microns"}}, ValueError, "the unit of space axis 'x' must be one of"),
        ({"levels": 0}, ValueError, "levels must be >= 1; got 0"),
        ({"downsample": "max"}, ValueError, "downsample must be one of"),
        ({"ome": False, "levels": 2}, ValueError, "levels need ome=True"),
        ({"levels": 2, "compute": False}, ValueError, "compute=False needs levels=1"),
        ({"ome": "yes"}, TypeError, "ome must be True or False"),
    ],
)
def test_ome_bad_arguments_write_nothing(tmp_path, kwargs, error, match):
    kwargs = {"ome": True, **kwargs}
    with pytest.raises(error, match=match):
        dp.to_zarr(da.zeros((4, 8, 8), chunks=4), tmp_path / "bad.zarr", **kwargs)
    assert not (tmp_path / "bad.zarr").exists()


def test_ome_six_dims_refused(tmp_path):
    with pytest.raises(ValueError, match="an OME-Zarr image has 2 to 5 axes; the array has 6"):
        dp.to_zarr(da.zeros((1,) * 6), tmp_path / "six.zarr", ome=True)


def test_non_uniform_coordinate_refused(tmp_path):
    vol = xr.DataArray(np.zeros((3, 4)), dims=("y", "x"), coords={"x": [0, 1, 3, 4]})
    with pytest.raises(ValueError, match="the coordinate 'x' is not evenly increasing"):
        dp.to_zarr(vol, tmp_path / "bad.zarr", ome=True)
    dp.to_zarr(vol, tmp_path / "ok.zarr", ome=True, scale=(1.0, 1.0))
    assert dp.open_volume(tmp_path / "ok.zarr", xarray=True).dims == ("y", "x")


# --------------------------------------------------------------------------------------------
# recipes (docs/user-guide.md "Formats"): TIFF, HDF5, NIfTI
# --------------------------------------------------------------------------------------------


def test_recipe_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    vol = np.random.default_rng(8).random((20, 32, 40)).astype(np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", vol, tile=(16, 16))

    store = tifffile.imread(tmp_path / "stack.tif", aszarr=True)  # a read-only zarr store
    volume = dp.open_volume(store)  # lazy: one task per TIFF tile
    out = dp.to_zarr(dp.apply_patches(volume, lambda b: 2 * b, 16, 8),
                     tmp_path / "pred.zarr", ome=True, levels=2)
    store.close()
    np.testing.assert_allclose(dp.open_volume(out).compute(), 2 * vol, rtol=1e-6)


@pytest.mark.needs_dask("from_array of an object not tokenized deterministically (h5py dataset)")
def test_recipe_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    vol = np.random.default_rng(9).random((20, 32, 40)).astype(np.float32)
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f.create_dataset("raw", data=vol, chunks=(10, 16, 20))

    with h5py.File(tmp_path / "scan.h5", "r") as f:
        dset = f["raw"]
        volume = da.from_array(dset, chunks=dset.chunks)  # lazy, HDF5 chunk by chunk
        dp.to_zarr(dp.apply_patches(volume, lambda b: 2 * b, 16, 8), tmp_path / "pred.zarr")
    np.testing.assert_allclose(dp.open_volume(tmp_path / "pred.zarr").compute(), 2 * vol,
                               rtol=1e-6)


@pytest.mark.needs_dask("Array.transpose(*axes)")
def test_recipe_nifti(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(10).random((40, 32, 20)).astype(np.float32)  # x, y, z
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "ct.nii")

    img = nib.load(tmp_path / "ct.nii")  # header only; dataobj reads slices on demand
    volume = da.from_array(img.dataobj, chunks=(20, 16, 10)).transpose(2, 1, 0)  # z, y, x
    zooms = [float(z) for z in img.header.get_zooms()[2::-1]]
    dp.to_zarr(dp.apply_patches(volume, lambda b: 2 * b, 16, 8), tmp_path / "pred.zarr",
               ome=True, scale=zooms, units=dict.fromkeys("zyx", "millimeter"))
    pred = dp.open_volume(tmp_path / "pred.zarr", xarray=True)
    np.testing.assert_allclose(pred.values, 2 * vol.transpose(2, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(pred.coords["z"].values, 2.5 * np.arange(20))


def test_open_volume_combines_dataset_and_multiscale_transformations(tmp_path):
    """NGFF: a point is dataset scale, then dataset translation, then the multiscale's own
    transformations (here a further scale and a translation)."""
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=3)
    root.create_array("full", shape=(4, 6), dtype="f4", dimension_names=("y", "x"))
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space", "unit": "nanometer"},
                 {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [{"path": "full", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 3.0]},
            {"type": "translation", "translation": [1.0, -1.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [10.0, 1.0]},
                                      {"type": "translation", "translation": [0.0, 5.0]}],
    }]}
    models05.Image.from_zarr(root)  # a valid image
    vol = dp.open_volume(tmp_path / "img.zarr", xarray=True)
    np.testing.assert_allclose(vol.coords["y"].values, 10.0 * (1.0 + 2.0 * np.arange(4)))
    np.testing.assert_allclose(vol.coords["x"].values, 5.0 + (-1.0 + 3.0 * np.arange(6)))
    assert vol.coords["y"].attrs["units"] == "nanometer"


@pytest.mark.parametrize("scale", [[0.0, 1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, 1.0, -2.0]])
def test_ome_metadata_with_a_degenerate_scale_is_refused_as_coordinates(tmp_path, scale):
    pytest.importorskip("xarray")
    dp.to_zarr(np.ones((4, 8, 8), np.float32), tmp_path / "i.zarr", ome=True, chunks=4)
    g = zarr.open_group(str(tmp_path / "i.zarr"), mode="r+")
    attrs = dict(g.attrs)
    attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = scale
    g.attrs.put(attrs)
    with pytest.raises(ValueError, match=r"the OME-Zarr metadata gives axis '\w' of level 0 "
                                         r"scale .* need a positive finite scale"):
        dp.open_volume(tmp_path / "i.zarr", xarray=True)
    assert dp.open_volume(tmp_path / "i.zarr").shape == (4, 8, 8)  # the data still opens


def test_a_datetime_coordinate_is_refused_not_dropped_on_ome(tmp_path):
    xr = pytest.importorskip("xarray")
    arr = xr.DataArray(np.ones((3, 4, 4), np.float32), dims=("t", "y", "x"),
                       coords={"t": np.array(["2024-01-01", "2024-01-02", "2024-01-03"],
                                             dtype="datetime64[D]")})
    with pytest.raises(ValueError, match=r"the coordinate 't' holds datetime64\[\w+\] values, "
                                         r"which OME-Zarr cannot store"):
        dp.to_zarr(arr, tmp_path / "t.zarr", ome=True)
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("multiscales, match", [
    ("abc", "multiscales must be a list; got 'abc'"),
    (["abc"], "each multiscale must be an object; got 'abc'"),
    ([{"axes": ["z", "y", "x"], "datasets": []}], r"a multiscale needs a non-empty list of "
                                                  r"datasets .*; got \[\]"),
    ([{"axes": ["z", "y", "x"], "datasets": ["0"]}], "each dataset must be an object with a "
                                                     "path; got '0'"),
    ([{"axes": ["z", "y", "x"], "datasets": [{"coordinateTransformations": []}]}],
     "each dataset must be an object with a path"),
])
def test_malformed_ome_metadata_is_named_as_such(tmp_path, multiscales, match):
    g = zarr.open_group(str(tmp_path / "i.zarr"), mode="w", zarr_format=3)
    g.create_array("0", shape=(4, 8, 8), chunks=(4, 8, 8), dtype="f4")
    g.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    with pytest.raises(ValueError, match=r"the OME-Zarr metadata of the root of store .* is "
                                         r"malformed: " + match):
        dp.open_volume(tmp_path / "i.zarr")


def test_an_ome_scale_of_the_wrong_length_is_named(tmp_path):
    pytest.importorskip("xarray")
    g = zarr.open_group(str(tmp_path / "i.zarr"), mode="w", zarr_format=3)
    g.create_array("0", shape=(4, 8, 8), chunks=(4, 8, 8), dtype="f4")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": ["z", "y", "x"], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2]}]}]}]}
    with pytest.raises(ValueError, match=r"malformed: a scale needs 3 numbers, one per axis; "
                                         r"got \[1, 2\]"):
        dp.open_volume(tmp_path / "i.zarr", xarray=True)
