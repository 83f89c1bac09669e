"""Training loaders: grid and random patches from Zarr/Dask/NumPy, label-balanced sampling."""

from __future__ import annotations

import math
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from daskpatch import extract_patches
from daskpatch.data import INDEX_ATTR, PatchDataset, RandomPatchDataset
from daskpatch.geometry.grid import PatchGrid

from ..conftest import write_zarr as to_zarr

TORCH_REASON = "PyTorch is not installed (pip install torch==2.13.0 for the DataLoader tests)"


def label_of(image: np.ndarray) -> np.ndarray:
    """The voxelwise rule that makes labels from images in these tests (about 3% foreground)."""
    return (image >= 97).astype(np.uint8)


def make_pair(shape, seed=0):
    image = np.random.default_rng(seed).integers(0, 100, shape).astype(np.float32)
    return image, label_of(image)


@pytest.fixture
def zpair(tmp_path):
    """Two Zarr image/label pairs of different shapes (paths), and their NumPy data."""
    images, labels, data = [], [], []
    for k, shape in enumerate([(40, 48, 56), (36, 32, 40)]):
        image, label = make_pair(shape, seed=k)
        images.append(to_zarr(tmp_path / f"image{k}.zarr", image, (16, 16, 16)))
        labels.append(to_zarr(tmp_path / f"label{k}.zarr", label, (16, 16, 16)))
        data.append((image, label))
    return images, labels, data


def forbid_compute(*args, **kwargs):
    raise AssertionError("a Dask computation ran")


# ----------------------------------------------------------------------------------------------
# PatchDataset
# ----------------------------------------------------------------------------------------------
SOURCES = {
    "numpy": lambda a, p: a,
    "zarr-path": lambda a, p: to_zarr(p, a, (8, 16, 8)),
    "zarr-array": lambda a, p: zarr.open_array(to_zarr(p, a, (8, 16, 8)), mode="r"),
    "dask-from-zarr": lambda a, p: da.from_zarr(to_zarr(p, a, (8, 16, 8))),
    "dask-graph": lambda a, p: da.from_array(a, chunks=(10, 10, 10)) * 1,
}
_NEEDS = {
    "dask-from-zarr": pytest.mark.needs_dask("dask.array.from_zarr"),
    "dask-graph": pytest.mark.needs_dask("NumPy scalar promotion (float32 * 1 stays float32)"),
}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=_NEEDS.get(k, ()))
                                  for k in sorted(SOURCES)])
def test_patch_dataset_is_the_grid(kind, tmp_path):
    image, label = make_pair((20, 24, 18))
    ds = PatchDataset(SOURCES[kind](image, tmp_path / "i.zarr"), (8, 8, 6), stride=(6, 8, 6),
                      labels=SOURCES[kind](label, tmp_path / "l.zarr"))
    grid = PatchGrid(image.shape, (8, 8, 6), (6, 8, 6))
    assert len(ds) == len(grid) and ds.grids[0] == grid
    for i in range(len(ds)):
        s = ds[i]
        sl = grid[i]
        assert s["location"].tolist() == list(grid.start(i)) and s["location"].dtype == np.int64
        assert int(s["volume"]) == 0
        np.testing.assert_array_equal(s["image"], image[sl][None])
        np.testing.assert_array_equal(s["label"], label[sl][None])
        assert s["image"].dtype == np.float32 and s["label"].dtype == np.uint8


def test_patch_dataset_many_volumes(zpair):
    images, labels, data = zpair
    ds = PatchDataset(images, 16, labels=labels)
    lens = [len(PatchGrid(d[0].shape, 16)) for d in data]
    assert len(ds) == sum(lens)
    for i in [0, lens[0] - 1, lens[0], len(ds) - 1, -1]:
        s = ds[i]
        v = int(s["volume"])
        assert v == (0 if i % len(ds) < lens[0] else 1)
        sl = tuple(slice(a, a + 16) for a in s["location"])
        np.testing.assert_array_equal(s["image"][0], data[v][0][sl])
        np.testing.assert_array_equal(s["label"][0], data[v][1][sl])


@pytest.mark.parametrize("channel_axis", [0, -1])
@pytest.mark.parametrize("label_channels", [False, True])
def test_patch_dataset_channels_come_first(channel_axis, label_channels):
    image = np.random.default_rng(1).random((3, 10, 12)).astype(np.float32)  # (C, Y, X)
    label = (image > 0.5).astype(np.uint8)
    if channel_axis == -1:
        image, label = np.moveaxis(image, 0, -1), np.moveaxis(label, 0, -1)
    lab = label if label_channels else label.take(0, axis=channel_axis)
    ds = PatchDataset(image, (4, 6), labels=lab, channel_axis=channel_axis)
    s = ds[len(ds) - 1]
    y, x = s["location"]
    chw = image if channel_axis == 0 else np.moveaxis(image, -1, 0)
    np.testing.assert_array_equal(s["image"], chw[:, y:y + 4, x:x + 6])
    assert s["image"].flags.c_contiguous
    assert s["label"].shape == ((3 if label_channels else 1), 4, 6)


def test_patch_dataset_batch_axes_are_volumes():
    image = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)  # (B1, B2, Y, X)
    ds = PatchDataset(image, (4, 4))
    assert len(ds.volumes) == 6 and ds.volumes[4] == (0, (1, 1)) and len(ds) == 24
    s = ds[4 * 4 + 3]
    assert int(s["volume"]) == 4
    np.testing.assert_array_equal(s["image"][0], image[1, 1, 4:8, 4:8])


@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "edge", "wrap"])
def test_patch_dataset_border_pad(pad_mode):
    image, label = make_pair((9, 11))
    ds = PatchDataset(image, 4, border="pad", labels=label, pad_mode=pad_mode)
    grid = PatchGrid(image.shape, 4, border="pad")
    padded = np.pad(image, grid.pad_width, mode=pad_mode)
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_array_equal(s["image"][0], padded[grid[i]])
        np.testing.assert_array_equal(s["label"][0], label_of(s["image"][0]))


@pytest.mark.parametrize("pad_mode", ["reflect", "symmetric", "edge", "wrap", "constant"])
def test_loader_and_extract_pad_alike(tmp_path, pad_mode):
    """The loaders and extract_patches share one padding: same patches from a Zarr volume with
    a channel axis, whose patches run far past the end (stride > 1, patch wider than a side)."""
    image = np.random.default_rng(3).random((2, 5, 3, 7)).astype(np.float32)
    path = to_zarr(tmp_path / "img.zarr", image, (2, 2, 2, 3))
    value = -2 if pad_mode == "constant" else 0
    ds = PatchDataset(path, (4, 4), 3, border="pad", channel_axis=0, pad_mode=pad_mode,
                      pad_value=value)
    expected = extract_patches(zarr.open_array(path, mode="r"), (4, 4), 3, border="pad",
                               channel_axis=0, pad_mode=pad_mode, pad_value=value).compute()
    got = np.stack([ds[i]["image"] for i in range(len(ds))])  # (N, C, 4, 4) per 2-D slice
    assert len(ds) == len(expected)
    np.testing.assert_array_equal(got, expected)


def test_patch_dataset_border_drop():
    image = np.zeros((10, 10), np.float32)
    assert len(PatchDataset(image, 4, border="drop")) == 4
    assert len(PatchDataset(image, 4)) == 9


# ----------------------------------------------------------------------------------------------
# RandomPatchDataset: geometry, modes, statistics
# ----------------------------------------------------------------------------------------------
def check_inside(ds, shapes, n=None):
    for i in range(n or len(ds)):
        s = ds[i]
        shape = shapes[int(s["volume"])]
        loc, c = s["location"], s["center"]
        assert (loc >= 0).all() and (loc + ds.size <= shape).all()
        assert (loc <= c).all() and (c < loc + ds.size).all()
        assert s["image"].shape[1:] == ds.size


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    frac=st.floats(0.05, 1.0),
    pos=st.sampled_from([None, 0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_random_patches_lie_inside(shape, frac, pos, seed, data):
    assume(math.prod(shape) >= 2)  # room for both classes
    size = tuple(max(1, int(n * frac)) for n in shape)
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) < 0.3).astype(np.uint8)
    label.flat[0], label.flat[-1] = 1, 0  # both classes present
    image = label.astype(np.float32)
    ds = RandomPatchDataset(image, size, samples_per_epoch=20, labels=label, pos_fraction=pos,
                            seed=data.draw(st.integers(0, 99)))
    check_inside(ds, [np.array(shape)])
    if pos in (0.0, 1.0):
        assert all(bool(label[tuple(ds[i]["center"])]) == bool(pos) for i in range(len(ds)))


@pytest.mark.parametrize("pos_fraction", [0.33, 0.8])
def test_pos_fraction_is_hit(zpair, pos_fraction):
    _, labels, data = zpair
    images = [d[0] for d in data]  # NumPy images, Zarr labels: the draws read only the labels
    n = 800
    ds = RandomPatchDataset(images, 8, samples_per_epoch=n, labels=labels,
                            pos_fraction=pos_fraction, seed=3)
    hits = np.array([data[int(s["volume"])][1][tuple(s["center"])] > 0 for s in map(ds.__getitem__,
                                                                                      range(n))])
    sigma = math.sqrt(pos_fraction * (1 - pos_fraction) / n)
    assert abs(hits.mean() - pos_fraction) < 4.5 * sigma
    # the labels are only ~3% foreground: uniform sampling would be far from pos_fraction
    assert np.mean([d[1].mean() for d in data]) < 0.05


def test_foreground_draws_are_uniform_over_foreground_voxels(tmp_path):
    label = np.zeros((32, 32, 32), np.uint8)
    fg = [(1, 1, 1), (1, 30, 2), (17, 17, 17), (31, 31, 31)]  # in four different 16^3 chunks
    for p in fg:
        label[p] = 1
    label[20:22, 2:4, 2:4] = 1  # 8 more voxels, all in one chunk
    path = to_zarr(tmp_path / "l.zarr", label, (16, 16, 16))
    n = 900
    ds = RandomPatchDataset(label, 4, samples_per_epoch=n, labels=path, pos_fraction=1.0)
    centers = [tuple(ds[i]["center"].tolist()) for i in range(n)]
    assert all(label[c] for c in centers)
    counts = np.array([centers.count(p) for p in fg])
    expected = n / 12  # 12 foreground voxels in all, each equally likely
    assert (np.abs(counts - expected) < 5 * math.sqrt(expected)).all()


def test_weights_are_followed(tmp_path):
    weights = np.zeros((24, 24), np.float32)
    weights[3, 4], weights[20, 18] = 1.0, 3.0
    path = to_zarr(tmp_path / "w.zarr", weights, (8, 8))
    image = np.zeros((24, 24), np.float32)
    n = 800
    ds = RandomPatchDataset(image, 6, samples_per_epoch=n, weights=path, seed=5)
    assert ds.mode == "weights"
    centers = [tuple(ds[i]["center"].tolist()) for i in range(n)]
    assert set(centers) == {(3, 4), (20, 18)}
    share = centers.count((20, 18)) / n
    assert abs(share - 0.75) < 4.5 * math.sqrt(0.75 * 0.25 / n)


@pytest.mark.needs_dask("map_blocks meta with block_info")
def test_weights_from_a_dask_graph_with_a_channel_axis():
    weights = da.zeros((1, 20, 20), chunks=(1, 10, 10)) + 0
    weights = weights.map_blocks(lambda b, block_info=None: b + (
        1.0 if block_info[None]["chunk-location"] == (0, 1, 1) else 0.0), dtype=float)
    image = np.zeros((2, 20, 20), np.float32)
    ds = RandomPatchDataset(image, 4, samples_per_epoch=50, weights=weights, channel_axis=0)
    for i in range(len(ds)):
        c = ds[i]["center"]
        assert (c >= 10).all() and ds[i]["image"].shape == (2, 4, 4)


def test_uniform_sampling_covers_the_volumes_in_proportion():
    a, b = np.zeros((30, 30), np.float32), np.ones((10, 30), np.float32)
    n = 1000
    ds = RandomPatchDataset([a, b], 5, samples_per_epoch=n, seed=2)
    assert ds.mode == "uniform" and ds.index_cells == 0
    vols = np.array([int(ds[i]["volume"]) for i in range(n)])
    assert abs(vols.mean() - 0.25) < 4.5 * math.sqrt(0.25 * 0.75 / n)
    check_inside(ds, [np.array(a.shape), np.array(b.shape)], n=200)


def test_images_and_labels_stay_aligned(zpair):
    images, labels, _ = zpair
    ds = RandomPatchDataset(images, (8, 12, 10), samples_per_epoch=200, labels=labels,
                            pos_fraction=0.5)
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], label_of(s["image"]))


def test_seed_and_epoch_decide_the_draws(zpair):
    images, labels, _ = zpair
    kw = dict(samples_per_epoch=30, labels=labels, pos_fraction=0.5)

    def locations(ds):
        return [(int(ds[i]["volume"]), *ds[i]["location"].tolist()) for i in range(len(ds))]

    a = RandomPatchDataset(images, 8, seed=7, **kw)
    first = locations(a)
    assert locations(RandomPatchDataset(images, 8, seed=7, **kw)) == first
    assert locations(RandomPatchDataset(images, 8, seed=8, **kw)) != first
    a.set_epoch(1)
    assert a.epoch == 1 and locations(a) != first
    a.set_epoch(0)
    assert locations(a) == first
    # sample i does not depend on which other samples were read, nor in what order
    assert [(int(a[i]["volume"]), *a[i]["location"].tolist()) for i in (29, 3)] == [
        first[29], first[3]]


# ----------------------------------------------------------------------------------------------
# The index: O(chunks), cached in the Zarr attributes
# ----------------------------------------------------------------------------------------------
def test_index_is_o_chunks(tmp_path):
    sizes = {}
    for edge, chunk in [(32, 8), (64, 16), (128, 32)]:  # 64 chunks each, 8x more voxels each time
        label = np.zeros((edge,) * 3, np.uint8)
        label[edge // 2, edge // 3, edge // 4] = 1
        path = to_zarr(tmp_path / f"l{edge}.zarr", label, (chunk,) * 3)
        ds = RandomPatchDataset(path, 8, samples_per_epoch=4, labels=path, pos_fraction=0.5,
                                cache_index="off")
        assert ds.index_cells == 64
        sizes[edge] = ds.index_nbytes
        ds[0]
    assert len(set(sizes.values())) == 1  # independent of the voxel count
    assert sizes[128] <= 64 * 8 * 4 + 1024  # a few int64 per chunk (cumulative counts, bounds)
    assert sizes[128] < 128**3 / 1000  # < 0.1% of one byte per voxel
    index = ds._index
    assert all(a.size <= 64 + 1 for a in (index.cdf, index.bg_cdf, *index.bounds[0]))
    # a pickled dataset is small too: paths and the tables, no voxel data
    assert len(pickle.dumps(ds)) < 20_000


def test_index_is_cached_in_the_zarr_attributes(tmp_path):
    image, label = make_pair((32, 32, 32))
    path = to_zarr(tmp_path / "l.zarr", label, (16, 16, 16))
    ds = RandomPatchDataset(image, 8, samples_per_epoch=10, labels=path, pos_fraction=0.5)
    assert ds._index.computed == (0,) and ds._index.cached == (0,)
    cached = zarr.open_array(path, mode="r").attrs[INDEX_ATTR]
    assert cached["kind"] == "foreground" and sum(cached["counts"]) == int(label.sum())
    with dask.config.set(scheduler=forbid_compute):  # the second build reads the cache only
        again = RandomPatchDataset(image, 8, samples_per_epoch=10, labels=path, pos_fraction=0.5)
        assert again._index.computed == ()
        with pytest.raises(AssertionError, match="a Dask computation ran"):
            RandomPatchDataset(image, 8, samples_per_epoch=10, labels=path, pos_fraction=0.5,
                               cache_index="refresh")
    assert [again[i]["location"].tolist() for i in range(10)] == [
        ds[i]["location"].tolist() for i in range(10)]
    # a read-only zarr.Array is left untouched; "off" neither reads nor writes
    other = to_zarr(tmp_path / "l2.zarr", label, (16, 16, 16))
    for arr, mode in [(zarr.open_array(other, mode="r"), "auto"), (other, "off")]:
        ds = RandomPatchDataset(image, 8, samples_per_epoch=10, labels=arr, pos_fraction=0.5,
                                cache_index=mode)
        assert ds._index.cached == ()
        assert INDEX_ATTR not in zarr.open_array(other, mode="r").attrs


def test_a_stale_cache_is_reported(tmp_path):
    image, label = make_pair((32, 32))
    path = to_zarr(tmp_path / "l.zarr", label, (16, 16))
    RandomPatchDataset(image, 8, samples_per_epoch=10, labels=path, pos_fraction=1.0)
    zarr.open_array(path, mode="r+")[...] = 0  # rewritten in place: same shape, chunks, dtype
    ds = RandomPatchDataset(image, 8, samples_per_epoch=10, labels=path, pos_fraction=1.0)
    with pytest.raises(ValueError, match="no longer matches its chunk index.*'refresh'"):
        ds[0]
    with pytest.raises(ValueError, match="needs foreground voxels"):
        RandomPatchDataset(image, 8, samples_per_epoch=10, labels=path, pos_fraction=1.0,
                           cache_index="refresh")


def test_pickled_datasets_reopen_their_stores(zpair):
    images, labels, _ = zpair
    ds = RandomPatchDataset(images, 8, samples_per_epoch=5, labels=labels, pos_fraction=0.5)
    ds[0]
    assert ds._set.images[0]._handle is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._set.images[0]._handle is None  # no open handle travels to a worker
    assert [clone[i]["location"].tolist() for i in range(5)] == [
        ds[i]["location"].tolist() for i in range(5)]
    src = ds._set.images[0]
    handle = src.array
    src._pid = -1  # as seen from a forked child: the handle belongs to another process
    assert src.array is not handle and src._pid > 0


# ----------------------------------------------------------------------------------------------
# With a real torch DataLoader
# ----------------------------------------------------------------------------------------------
def batches(ds, torch, num_workers, **kw):
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=num_workers, **kw)
    return [{k: v.numpy() for k, v in b.items()} for b in loader]


@pytest.mark.processes
@pytest.mark.torch
def test_dataloader_workers_give_the_same_aligned_patches(zpair):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    images, labels, _ = zpair
    ds = RandomPatchDataset(images, (8, 12, 10), samples_per_epoch=40, labels=labels,
                            pos_fraction=0.4, seed=11)
    serial = batches(ds, torch, 0)
    parallel = batches(ds, torch, 2)
    assert len(parallel) == 6 and parallel[0]["image"].shape == (7, 1, 8, 12, 10)
    for a, b in zip(serial, parallel):
        for key in ("image", "label", "location", "volume", "center"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(b["label"], label_of(b["image"]))
    # no two samples of an epoch are the same draw
    draws = {(int(v), *c) for b in parallel for v, c in zip(b["volume"], b["center"].tolist())}
    assert len(draws) == 40
    ds.set_epoch(1)  # workers are recreated per epoch and see the new epoch
    epoch1 = batches(ds, torch, 2)
    assert not all((a["center"] == b["center"]).all() for a, b in zip(parallel, epoch1))


@pytest.mark.processes
@pytest.mark.torch
def test_dataloader_spawned_workers_with_grid_patches(zpair):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    images, labels, data = zpair
    ds = PatchDataset(images, 16, stride=12, labels=labels)
    got = batches(ds, torch, 2, multiprocessing_context="spawn")
    assert sum(len(b["volume"]) for b in got) == len(ds)
    for b in got:
        np.testing.assert_array_equal(b["label"], label_of(b["image"]))
        for v, loc, img in zip(b["volume"], b["location"], b["image"]):
            sl = tuple(slice(a, a + 16) for a in loc)
            np.testing.assert_array_equal(img[0], data[v][0][sl])


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------
IMG = np.zeros((16, 16), np.float32)
LAB = np.zeros((16, 16), np.uint8)
LAB[3, 3] = 1


def random_ds(**kw):
    args = dict(images=IMG, size=4, samples_per_epoch=4, labels=LAB, pos_fraction=0.5)
    args.update(kw)
    return RandomPatchDataset(args.pop("images"), args.pop("size"), **args)


def _unknown_shape() -> da.Array:
    """A Dask array of unknown shape (made in the test: building it needs boolean-mask
    indexing, which dask's array query planning lacks)."""
    return da.zeros((10, 10), chunks=5)[da.zeros(10, chunks=5) > 0]


BAD_RANDOM = [
    (dict(images=3), TypeError, r"images\[0\] must be a NumPy, Dask or Zarr array or a Zarr "
                                r"store path; got 3 of type int"),
    (dict(images=[]), ValueError, "images must be a volume or a non-empty list"),
    (dict(images=[IMG, IMG[None]]), ValueError, "same number of spatial axes"),
    (dict(size=2.5), TypeError, "size must be an integer or a sequence"),
    (dict(size=(4, 4, 4)), ValueError, "size has 3 entries but the 2-D images"),
    (dict(size=(4, 17)), ValueError, r"size \(4, 17\) does not fit in images\[0\]"),
    (dict(size=0), ValueError, "size must be >= 1"),
    (dict(samples_per_epoch=0), ValueError, "samples_per_epoch must be >= 1; got 0"),
    (dict(samples_per_epoch=2.0), TypeError, "samples_per_epoch must be an integer; got 2.0"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(pos_fraction=1.5), ValueError, "pos_fraction must be between 0 and 1; got 1.5"),
    (dict(pos_fraction="half"), TypeError, "pos_fraction must be a number"),
    (dict(labels=None), ValueError, "pos_fraction needs labels"),
    (dict(weights=IMG), ValueError, "either pos_fraction .* or weights"),
    (dict(labels=[LAB, LAB]), ValueError, "one volume per image: 1 images but 2 labels"),
    (dict(labels=LAB[:8]), ValueError, r"labels\[0\] must have the same batch and spatial shape"),
    (dict(labels=LAB[None]), ValueError, r"labels\[0\] must have 2 axes to match"),
    (dict(labels=np.zeros_like(LAB)), ValueError, "needs foreground voxels"),
    (dict(labels=np.ones_like(LAB)), ValueError, "needs background voxels"),
    (dict(pos_fraction=None, weights=-IMG - 1), ValueError,
     r"weights\[0\] must be finite and >= 0"),
    (dict(pos_fraction=None, weights=IMG), ValueError, "weights are zero everywhere"),
    (dict(images=np.zeros((2, 16, 16)), pos_fraction=None, labels=None, channel_axis=0,
          weights=np.ones((2, 16, 16))), ValueError, "must have one channel"),
    (dict(channel_axis=2), ValueError, "channel_axis must be None or an axis of the 2-D"),
    (dict(cache_index="yes"), ValueError, r"cache_index must be one of \('auto', 'refresh'"),
    pytest.param(dict(images=_unknown_shape), ValueError, "must have a known shape",
                 marks=pytest.mark.needs_dask("boolean-mask indexing (unknown chunk sizes)")),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_RANDOM,
                         ids=[(c.values if hasattr(c, "values") else c)[2] for c in BAD_RANDOM])
def test_random_dataset_bad_arguments(kwargs, exc, match):
    kwargs = {k: v() if v is _unknown_shape else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        random_ds(**kwargs)


def test_bad_paths_indices_and_epochs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images\[0\]: no Zarr array at"):
        PatchDataset(str(tmp_path / "missing.zarr"), 4)
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(ValueError, match="is a Zarr group, not an array"):
        PatchDataset(str(tmp_path / "g.zarr"), 4)
    with pytest.raises(ValueError, match="border must be one of"):
        PatchDataset(IMG, 4, border="crop")
    with pytest.raises(ValueError, match="pad_mode must be one of"):
        PatchDataset(IMG, 4, pad_mode="mirror")
    with pytest.raises(ValueError, match="larger than the volume shape"):
        PatchDataset(IMG, 17)
    ds = PatchDataset(IMG, 4)
    with pytest.raises(IndexError, match="sample index 16 is out of range for a dataset of 16"):
        ds[16]
    with pytest.raises(TypeError, match="index must be an integer; got 1.0"):
        ds[1.0]
    rds = random_ds()
    with pytest.raises(IndexError, match="out of range"):
        rds[-5]
    with pytest.raises(ValueError, match="epoch must be >= 0; got -1"):
        rds.set_epoch(-1)


# ----------------------------------------------------------------------------------------------
# Transforms, label dtype, the epoch in persistent workers, constant padding
# ----------------------------------------------------------------------------------------------
def add_noise(item, rng):
    """A random augmentation: must be reproducible under the dataset's seed."""
    item["image"] = item["image"] + rng.normal(size=item["image"].shape).astype(np.float32)
    return item


def flip(item):
    """A transform without randomness (called with the item only)."""
    return {**item, "image": item["image"][:, ::-1].copy(), "flipped": np.asarray(True)}


def draws(ds, torch, num_workers, epochs=(0, 1), **kw):
    """Batches of each epoch through one DataLoader (its workers live across epochs)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=num_workers, **kw)
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out.append([{k: v.numpy() for k, v in b.items()} for b in loader])
    return out


@pytest.mark.processes
@pytest.mark.torch
@pytest.mark.parametrize("context", [None, "spawn"], ids=["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers(zpair, context):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    images, labels, _ = zpair
    ds = RandomPatchDataset(images, (8, 12, 10), samples_per_epoch=20, labels=labels,
                            pos_fraction=0.4, seed=3, transform=add_noise, label_dtype=np.int64)
    serial = draws(ds, torch, 0)
    parallel = draws(ds, torch, 2, persistent_workers=True, multiprocessing_context=context)
    for e in (0, 1):
        for a, b in zip(serial[e], parallel[e]):
            for key in ("image", "label", "location", "volume", "center"):
                np.testing.assert_array_equal(a[key], b[key])
            assert b["label"].dtype == np.int64
    assert not all((a["center"] == b["center"]).all() for a, b in zip(*parallel))
    assert not all((a["image"] == b["image"]).all() for a, b in zip(*parallel))


@pytest.mark.processes
@pytest.mark.torch
def test_grid_patches_with_a_seeded_transform_in_persistent_workers():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    image = np.random.default_rng(0).random((20, 24), dtype=np.float32)
    ds = PatchDataset(image, 8, stride=4, seed=5, transform=add_noise)
    serial = draws(ds, torch, 0)
    parallel = draws(ds, torch, 2, persistent_workers=True)
    for e in (0, 1):
        for a, b in zip(serial[e], parallel[e]):
            np.testing.assert_array_equal(a["image"], b["image"])
    # the patches are the same grid patches; only the (epoch-dependent) noise differs
    noise0 = np.concatenate([b["image"] for b in parallel[0]])
    noise1 = np.concatenate([b["image"] for b in parallel[1]])
    assert not np.allclose(noise0, noise1)


def test_transform_and_label_dtype_without_a_loader():
    image, label = make_pair((16, 16))
    ds = PatchDataset(image, 8, labels=label, transform=flip, label_dtype="int64")
    s = ds[1]
    np.testing.assert_array_equal(s["image"][0], image[0:8, 8:16][::-1])
    assert s["label"].dtype == np.int64 and bool(s["flipped"])
    rds = RandomPatchDataset(image, 8, samples_per_epoch=4, seed=1, transform=add_noise)
    first = rds[2]["image"]
    np.testing.assert_array_equal(rds[2]["image"], first)  # same seed, epoch, index
    plain = RandomPatchDataset(image, 8, samples_per_epoch=4, seed=1)[2]["image"]
    assert not np.array_equal(first, plain)
    rds.set_epoch(1)
    assert rds.epoch == 1 and not np.array_equal(rds[2]["image"], first)


def test_a_copy_has_its_own_epoch():
    import copy

    ds = RandomPatchDataset(IMG, 4, samples_per_epoch=4, seed=1)
    ds.set_epoch(3)
    other = copy.deepcopy(ds)
    again = pickle.loads(pickle.dumps(ds))
    assert other.epoch == again.epoch == 3
    ds.set_epoch(4)
    assert other.epoch == 3 and again.epoch == 3


def test_constant_padding_with_pad_value():
    image, label = make_pair((9, 11))
    ds = PatchDataset(image, 4, border="pad", labels=label, pad_mode="constant", pad_value=-5)
    grid = PatchGrid(image.shape, 4, border="pad")
    padded = np.pad(image, grid.pad_width, constant_values=-5)
    padded_label = np.pad(label, grid.pad_width, constant_values=0)
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["image"][0], padded[grid[i]])
        np.testing.assert_array_equal(ds[i]["label"][0], padded_label[grid[i]])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(transform=3), TypeError, r"transform must be a callable .* got 3 of type int"),
        (dict(label_dtype=np.int64), ValueError, r"label_dtype needs labels"),
        (dict(labels=LAB, label_dtype="intx"), TypeError, r"label_dtype must be a NumPy dtype"),
        (dict(pad_value=-1), ValueError, r"pad_value=-1 is the fill of pad_mode='constant'; "
                                         r"got pad_mode='reflect'"),
        (dict(pad_value="zero", pad_mode="constant"), TypeError,
         r"pad_value must be a number; got 'zero' of type str"),
        (dict(images=LAB, pad_value=-1, pad_mode="constant"), ValueError,
         r"pad_value=-1 does not fit the volume's dtype uint8 \(an integer from 0 to 255\)"),
    ],
)
def test_patch_dataset_bad_new_arguments(kwargs, exc, match):
    args = dict(images=IMG)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        PatchDataset(args.pop("images"), 4, **args)


def test_transform_must_return_the_item():
    ds = PatchDataset(IMG, 4, transform=lambda item: None)
    with pytest.raises(TypeError, match=r"transform must return the item dict; got None"):
        ds[0]


# -- values a loader must not change silently ----------------------------------------------------
@pytest.mark.parametrize("bad, dtype, shown", [(300, np.uint8, "300"), (-1, np.uint8, "-1"),
                                               (2**40, np.int32, str(2**40))])
def test_a_label_the_dtype_cannot_hold_is_refused_not_wrapped(bad, dtype, shown):
    lab = np.zeros((16, 16), np.int64)
    lab[2, 2] = bad
    ds = PatchDataset(IMG, 8, labels=lab, label_dtype=dtype)
    with pytest.raises(ValueError, match=rf"label_dtype={np.dtype(dtype)} holds .* but the label "
                                         rf"of sample 0 has {shown}"):
        ds[0]
    assert ds[1]["label"].dtype == dtype  # patches without it convert as before


def test_nan_labels_into_an_integer_dtype_are_refused():
    lab = np.zeros((16, 16), np.float32)
    lab[1, 1] = np.nan
    with pytest.raises(ValueError, match="label_dtype=int64 cannot hold NaN"):
        PatchDataset(IMG, 8, labels=lab, label_dtype=np.int64)[0]


def test_a_non_numeric_label_dtype_is_refused():
    with pytest.raises(TypeError, match="label_dtype must be a boolean, integer or floating"):
        PatchDataset(IMG, 8, labels=LAB, label_dtype="U3")


@pytest.mark.parametrize("epoch", [2**63, 2**64])
def test_an_epoch_beyond_64_bits_is_refused(epoch):
    ds = RandomPatchDataset(IMG, 8, samples_per_epoch=4, seed=1)
    with pytest.raises(ValueError, match=r"epoch must be an int from 0 to 2\*\*63 - 1"):
        ds.set_epoch(epoch)
    assert ds.epoch == 0
    ds.set_epoch(2**63 - 1)
    assert ds.epoch == 2**63 - 1 and ds[0]["image"].shape == (1, 8, 8)


def test_an_interrupted_output_warns_when_a_loader_opens_it(tmp_path):
    import daskpatch as dp

    dp.to_zarr(da.ones((16, 16), chunks=8), tmp_path / "o.zarr", compute=False)  # never run
    with pytest.warns(dp.IncompleteWarning, match=r"images\[0\] .* is an incomplete daskpatch "
                                                  r"output: 0 of 4 chunks"):
        PatchDataset(str(tmp_path / "o.zarr"), 8)
    with pytest.warns(dp.IncompleteWarning, match="incomplete daskpatch output"):
        RandomPatchDataset(zarr.open_array(tmp_path / "o.zarr"), 8, samples_per_epoch=2)
