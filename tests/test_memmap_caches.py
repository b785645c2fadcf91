"""Memory-mapped caches (io_utils.cached_arrays): the decoded images and the ORB keypoints of a dataset live
in a directory of .npy files, filled in place, renamed into place whole, and opened copy-on-write, so that
100k+ images never have to fit in RAM. Values equal the uncached ones; failures leave nothing behind."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_dataset
from siamese_retrieval.data import images as images_mod
from siamese_retrieval.data import keypoints as kp
from siamese_retrieval.data.images import decode_resized, images_cache_file, load_images
from siamese_retrieval.data.inputs import ImageInputs, KeypointInputs
from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints, keypoints_cache_file
from siamese_retrieval.io_utils import cached_arrays

SPECS = {"a": ((5, 3), np.float32), "b": ((4,), np.bool_), "empty": ((0, 7), np.uint8)}
SIZE = (32, 48)


def filler(calls: list | None = None, offset: float = 0.0):
    def fill(out: dict[str, np.ndarray]) -> None:
        if calls is not None:
            calls.append({k: type(v) for k, v in out.items()})
        out["a"][:] = np.arange(15, dtype=np.float32).reshape(5, 3) + offset
        out["b"][:] = [True, False, True, True]

    return fill


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def file_mapping_of(ptr: int) -> str | None:
    """The file mapped at address `ptr` in this process (Linux /proc/self/maps), or None (anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else None
    return None


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", n_streets=2, per_street=5, queries_per_street=4)


# ----------------------------------------------------------------------------------------- cached_arrays


def test_miss_writes_a_directory_then_hits_are_copy_on_write_memmaps(tmp_path, caplog):
    path, calls = tmp_path / "cache" / "thing", []
    with caplog.at_level(logging.INFO):
        first = cached_arrays(path, SPECS, "thing", filler(calls))
    assert [set(c.values()) for c in calls] == [{np.memmap}]  # the producer wrote straight into the files
    assert entries(path) == ["a.npy", "b.npy", "empty.npy"] and entries(path.parent) == ["thing"]
    assert "cache hit" not in caplog.text
    with caplog.at_level(logging.INFO):
        again = cached_arrays(path, SPECS, "thing", filler(calls))
    assert len(calls) == 1 and f"thing cache hit: {path}" in caplog.text
    for name, (shape, dtype) in SPECS.items():
        for arr in (first[name], again[name]):
            assert isinstance(arr, np.memmap) and arr.mode == "c" and Path(arr.filename) == path / f"{name}.npy"
            assert arr.shape == shape and arr.dtype == dtype and arr.flags.writeable and arr.flags.c_contiguous
    np.testing.assert_array_equal(again["a"], np.arange(15).reshape(5, 3))
    np.testing.assert_array_equal(again["b"], [True, False, True, True])
    again["a"][:] = -1  # copy-on-write: the process sees its change, the cache file never does
    assert (np.load(path / "a.npy") == np.arange(15).reshape(5, 3)).all()


def test_no_path_means_plain_arrays(tmp_path):
    arrays = cached_arrays(None, SPECS, "thing", filler())
    assert all(type(a) is np.ndarray for a in arrays.values())
    np.testing.assert_array_equal(arrays["a"], np.arange(15).reshape(5, 3))
    assert entries(tmp_path) == []


def test_failure_inside_fill_leaves_nothing(tmp_path):
    path = tmp_path / "cache" / "thing"

    def fails(out):
        out["a"][:2] = 1  # some data already written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_arrays(path, SPECS, "thing", fails)
    assert entries(path.parent) == []  # no final directory, no temporary one


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_full_disk_is_an_os_error_before_filling(tmp_path, monkeypatch):
    """Blocks are reserved before `fill` writes: a full disk is an OSError naming the file, not a SIGBUS."""
    import errno

    path, calls = tmp_path / "cache" / "thing", []

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as info:
        cached_arrays(path, SPECS, "thing", filler(calls))
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("a.npy")
    assert calls == [] and entries(path.parent) == []


def truncate(path: Path) -> None:
    data = (path / "a.npy").read_bytes()
    (path / "a.npy").write_bytes(data[: len(data) - 8])


def bad_header(path: Path) -> None:
    (path / "a.npy").write_bytes(b"not an npy file at all")


def missing_file(path: Path) -> None:
    (path / "b.npy").unlink()


def wrong_shape(path: Path) -> None:
    np.save(path / "a.npy", np.zeros((6, 3), np.float32))


def wrong_dtype(path: Path) -> None:
    np.save(path / "a.npy", np.zeros((5, 3), np.float64))


def fortran_order(path: Path) -> None:
    np.save(path / "a.npy", np.asfortranarray(np.zeros((5, 3), np.float32)))


def plain_file(path: Path) -> None:
    for f in path.iterdir():
        f.unlink()
    path.rmdir()
    path.write_bytes(b"an old single-file cache")


@pytest.mark.parametrize("damage, message", [
    (truncate, "unreadable"), (bad_header, "unreadable"), (missing_file, "unreadable"), (plain_file, "unreadable"),
    (wrong_shape, "unexpected shapes"), (wrong_dtype, "unexpected shapes"), (fortran_order, "unexpected shapes"),
])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage, message):
    path = tmp_path / "cache" / "thing"
    cached_arrays(path, SPECS, "thing", filler())
    damage(path)
    calls = []
    with caplog.at_level(logging.WARNING):
        arrays = cached_arrays(path, SPECS, "thing", filler(calls))
    assert len(calls) == 1 and message in caplog.text and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(arrays["a"], np.arange(15).reshape(5, 3))
    assert entries(path) == ["a.npy", "b.npy", "empty.npy"] and entries(path.parent) == ["thing"]


def test_a_concurrent_writer_that_finished_first_wins(tmp_path):
    path = tmp_path / "cache" / "thing"

    def slow_fill(out):
        cached_arrays(path, SPECS, "thing", filler(offset=100.0))  # another writer completes meanwhile
        filler()(out)

    arrays = cached_arrays(path, SPECS, "thing", slow_fill)
    np.testing.assert_array_equal(arrays["a"], np.arange(15).reshape(5, 3) + 100.0)  # theirs, kept
    assert entries(path.parent) == ["thing"]  # ours dropped


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "cache" / "thing"
    path.parent.mkdir(parents=True)
    dead = path.parent / ".thing.tmp-abc123-999999999"  # no such pid
    alive = path.parent / f".thing.tmp-def456-{os.getppid()}"  # a live writer's: left alone
    for d in (dead, alive):
        d.mkdir()
        (d / "a.npy").write_bytes(b"partial")
    cached_arrays(path, SPECS, "thing", filler())
    assert entries(path.parent) == sorted([alive.name, "thing"])


def test_cache_directory_gets_normal_permissions(tmp_path):
    path = tmp_path / "thing"
    cached_arrays(path, SPECS, "thing", filler())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask


# ----------------------------------------------------------------------------------------- images


def test_images_cache_is_memory_mapped_and_equals_decoding(dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain_db, plain_q = load_images(dataset, SIZE, None)
    assert type(plain_db) is np.ndarray
    outs = []
    decode = images_mod.decode_resized
    monkeypatch.setattr(images_mod, "decode_resized", lambda *a, **k: outs.append(type(k["out"])) or decode(*a, **k))
    db, q = load_images(dataset, SIZE, cache)
    assert outs == [np.memmap, np.memmap]  # decoded straight into the cache's files
    path = images_cache_file(dataset, SIZE, cache)
    assert path.name.startswith(f"images-{SIZE[0]}x{SIZE[1]}-") and entries(path) == ["db.npy", "q.npy"]
    monkeypatch.setattr(images_mod, "read_image", lambda p: pytest.fail("decoded although the cache should be used"))
    db2, q2 = load_images(dataset, SIZE, cache)
    for got, want in ((db, plain_db), (q, plain_q), (db2, plain_db), (q2, plain_q)):
        assert isinstance(got, np.memmap) and Path(got.filename).parent == path
        np.testing.assert_array_equal(got, want)
    assert images_cache_file(dataset, (24, 24), cache) != path


def test_decode_resized_fills_out(dataset):
    paths = [dataset.root / p for p in dataset.db_paths]
    out = np.zeros((len(paths), 3, *SIZE), np.uint8)
    assert decode_resized(paths, SIZE, out=out) is out
    np.testing.assert_array_equal(out, decode_resized(paths, SIZE))
    with pytest.raises(ValueError, match="out must be"):
        decode_resized(paths, SIZE, out=np.zeros((len(paths), 3, 8, 8), np.uint8))


def test_image_tensors_share_the_cache_pages(dataset, tmp_path):
    cache = tmp_path / "cache"
    inputs = ImageInputs(height=SIZE[0], width=SIZE[1])
    inputs.build(dataset, cache)  # miss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        db, q = inputs.build(dataset, cache)  # hit
    path = images_cache_file(dataset, SIZE, cache)
    assert db["image"].shape == (dataset.n_db, 3, *SIZE) and db["image"].dtype == torch.uint8
    if Path("/proc/self/maps").exists():  # the tensor's memory is the mapped cache file, not a copy in RAM
        assert file_mapping_of(db["image"].data_ptr()) == str(path / "db.npy")
        assert file_mapping_of(q["image"].data_ptr()) == str(path / "q.npy")
    np.testing.assert_array_equal(db["image"].numpy(), load_images(dataset, SIZE, None)[0])


# ----------------------------------------------------------------------------------------- keypoints


def test_keypoint_cache_is_memory_mapped_and_equals_extraction(dataset, tmp_path, monkeypatch):
    cache, cfg = tmp_path / "cache", OrbConfig()
    plain = extract_dataset_keypoints(dataset, cfg, None)
    outs = []
    extract_into = kp._extract_into
    monkeypatch.setattr(kp, "_extract_into", lambda paths, c, w, out, adv: outs.append({type(a) for a in out})
                        or extract_into(paths, c, w, out, adv))
    first = extract_dataset_keypoints(dataset, cfg, cache)
    assert outs == [{np.memmap}, {np.memmap}]  # extracted chunk by chunk straight into the cache's files
    path = keypoints_cache_file(dataset, cfg, cache)
    assert entries(path) == sorted(f"{f}.npy" for f in kp.KeypointFeatures.FIELDS)
    monkeypatch.setattr(kp, "_extract_chunk", lambda *a: pytest.fail("extracted although the cache should be used"))
    again = extract_dataset_keypoints(dataset, cfg, cache)
    for name, want in plain.arrays().items():
        assert type(want) is np.ndarray
        for feats in (first, again):
            got = getattr(feats, name)
            assert isinstance(got, np.memmap) and Path(got.filename) == path / f"{name}.npy"
            np.testing.assert_array_equal(got, want)
    assert keypoints_cache_file(dataset, OrbConfig(n_keypoints=5), cache) != path


def test_extract_paths_in_chunks_matches_one_image_at_a_time(dataset):
    cfg = OrbConfig()
    paths = [dataset.root / p for p in dataset.db_paths + dataset.q_paths]
    together = kp.extract_paths(paths, cfg, workers=2)
    for i, p in enumerate(paths):
        for arr, one in zip(together, kp.extract_orb(images_mod.read_image(p), cfg)):
            np.testing.assert_array_equal(arr[i], one)
    empty = kp.extract_paths([], cfg)
    assert [a.shape for a in empty] == [(0, 10, 32), (0, 10, 4), (0, 10)]


def test_keypoint_tensors_share_the_cache_pages(dataset, tmp_path):
    cache = tmp_path / "cache"
    inputs = KeypointInputs()
    inputs.build(dataset, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db, q = inputs.build(dataset, cache)
    path = keypoints_cache_file(dataset, inputs.cfg, cache)
    if Path("/proc/self/maps").exists():
        for side, tensors in (("db", db), ("q", q)):
            for field in ("desc", "geom", "mask"):
                assert file_mapping_of(tensors[field].data_ptr()) == str(path / f"{side}_{field}.npy")
    assert db["mask"].dtype == torch.bool and db["geom"].dtype == torch.float32


# ----------------------------------------------------------------------------------------- resident pages


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc (Linux)")
def test_releasing_mapped_pages_drops_them_from_rss_and_keeps_the_data(tmp_path: Path) -> None:
    from siamese_retrieval.io_utils import release_mapped_pages

    n, row = 400, 3 * 96 * 128  # 14 MiB
    specs = {"x": ((n, row), np.uint8)}
    rows = np.random.default_rng(0).integers(0, 255, size=(n, row), dtype=np.uint8)

    def fill(out: dict[str, np.ndarray]) -> None:
        out["x"][:] = rows
        assert release_mapped_pages(force=True) >= 1  # the cache being written is released too

    cached_arrays(tmp_path / "c", specs, "test", fill)
    cache = cached_arrays(tmp_path / "c", specs, "test", fill)  # a hit: copy-on-write memmap
    tensor = torch.from_numpy(cache["x"])
    int(tensor[:1].sum(dtype=torch.int64))  # the kernel's own code pages (file-backed too) load now
    release_mapped_pages(force=True)
    before = _rss_file_mib()
    assert int(tensor.sum(dtype=torch.int64)) == int(rows.sum(dtype=np.int64))  # touches every page
    touched = _rss_file_mib()
    assert touched - before > 0.8 * n * row / 2**20
    assert release_mapped_pages(force=True) >= 1
    assert _rss_file_mib() - before < 0.25 * n * row / 2**20
    np.testing.assert_array_equal(tensor.numpy(), rows)  # refaulted from the page cache, unchanged
    assert release_mapped_pages() == 0  # throttled: at most once a second unless forced
