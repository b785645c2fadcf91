"""Damaged caches and hostile inputs, table-driven: a damaged CACHE is one warning and a rebuild (same results,
the user's files untouched); a bad INPUT is one `error:` line and exit code 2, nothing written, no traceback.

    1. the ORB bag-of-words vocabulary cache (retrieval/orb_bow.py): every array checked against the config
    2. the retrieve index cache (retrieval/embedding_cache.py): dimension, size, metric, kind, embeddings
    3. `python -m siamese_retrieval.data.convert`: output names checked before writing, the output folder
       outside the source, a non-empty one replaced only with --overwrite and only once the new one is complete
    4. image bombs: width x height read from the header, refused above data.max_image_pixels, never decoded
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pytest

from siamese_retrieval.errors import ConfigError, DatasetError
from siamese_retrieval.image_header import DEFAULT_MAX_IMAGE_PIXELS, image_pixel_limit, max_image_pixels
from tests.conftest import ROOT, compose_config
from tests.helpers import make_dataset, textured_image


@pytest.fixture(autouse=True)
def _restore_pixel_limit():
    """A datamodule sets the process's pixel limit from its config: no test here leaves another one behind."""
    with image_pixel_limit(max_image_pixels()):
        yield


def snapshot(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under `folder` (links not followed): its type and content hash (a link: its target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.relpath(p, folder)
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused command (and that it is the only line on stderr besides log lines)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip("\n").splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


# ========================================================================================= 1. ORB vocabulary cache

from siamese_retrieval.retrieval import orb_bow  # noqa: E402
from siamese_retrieval.retrieval.orb_bow import BowConfig, cached_vocabulary, vocabulary_cache_path  # noqa: E402

BOW = "siamese_retrieval.retrieval.orb_bow"
NpzEdit = Callable[[dict[str, np.ndarray]], "dict[str, np.ndarray] | bytes"]


def _with(**changes: Callable[[np.ndarray], Any]) -> NpzEdit:
    """The cache's arrays with some replaced by `fn(old array)`."""
    return lambda a: {**a, **{k: np.asarray(fn(a[k])) for k, fn in changes.items()}}


def _nan_first(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[0] = np.nan
    return x


def _without(key: str) -> NpzEdit:
    return lambda a: {k: v for k, v in a.items() if k != key}


def _object_idf(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arr = np.empty(len(a["idf"]), dtype=object)
    arr[:] = [float(v) for v in a["idf"]]
    return {**a, "idf": arr}


VOCABULARY_DAMAGE: list[tuple[str, NpzEdit, str]] = [
    # (case, damage, what the one warning says)
    ("idf_of_the_wrong_length", _with(idf=lambda x: x[:-1]), "has idf of dtype float32 and shape (31,)"),
    ("float_words", _with(words=lambda x: x.astype(np.float32)), "has words of dtype float32"),
    ("array_valued_power", _with(power=lambda x: np.array([0.5, 0.5])), "has power of dtype float64 and shape (2,)"),
    ("words_of_the_wrong_width", _with(words=lambda x: x[:, :16].copy()),
     "has words of dtype uint8 and shape (32, 16)"),
    ("float64_idf", _with(idf=lambda x: x.astype(np.float64)), "has idf of dtype float64"),
    ("nan_idf", _with(idf=_nan_first), "non-finite idf"),
    ("negative_idf", _with(idf=lambda x: -np.abs(x) - 1), "idf weights outside"),
    ("another_power", _with(power=lambda x: np.float64(1.0)), "has power 1.0, expected 0.5"),
    ("string_power", _with(power=lambda x: np.array("0.5")), "has power of dtype <U3"),
    ("array_valued_n_images", _with(n_images=lambda x: np.arange(3)), "has n_images of dtype int64 and shape (3,)"),
    ("float_n_descriptors", _with(n_descriptors=lambda x: np.float64(x)), "has n_descriptors of dtype float64"),
    ("n_images_of_another_fit", _with(n_images=lambda x: np.int64(99)), "fitted on 99 images, expected 12"),
    ("n_descriptors_out_of_range", _with(n_descriptors=lambda x: np.int64(10**9)), "has n_descriptors 1000000000"),
    ("missing_idf", _without("idf"), "is unreadable"),
    ("pickled_object_idf", _object_idf, "is unreadable"),
    ("not_a_zip_file", lambda a: b"PK\x03\x04 this is not a zip archive", "is unreadable"),
    ("empty_file", lambda a: b"", "is unreadable"),
]


@pytest.fixture(scope="module")
def bow_features():
    """12 distinct textured images' ORB features (as tests/test_orb_bow.py)."""
    from siamese_retrieval.retrieval.orb_features import image_features
    from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig

    cfg = OrbRansacConfig(n_features=300)
    return [image_features(textured_image(np.random.default_rng(10 + i), 96, 128), cfg) for i in range(12)]


def _write_npz(path: Path, damaged: dict[str, np.ndarray] | bytes) -> None:
    if isinstance(damaged, bytes):
        path.write_bytes(damaged)
    else:
        with open(path, "wb") as f:
            np.savez(f, **damaged)  # allow_pickle: an object array is written (the reader must refuse it)


@pytest.mark.parametrize("case,damage,said", VOCABULARY_DAMAGE, ids=[c[0] for c in VOCABULARY_DAMAGE])
def test_damaged_vocabulary_cache_is_refitted_with_one_warning(case: str, damage: NpzEdit, said: str, bow_features,
                                                               tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    cfg, key = BowConfig(vocabulary_size=32, kmeans_samples=1000), {"fingerprint": case}
    first = cached_vocabulary(bow_features, key, cfg, tmp_path)
    path = vocabulary_cache_path(key, cfg, len(bow_features), tmp_path)  # the cache's real name, as the code makes it
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with np.load(path, allow_pickle=False) as z:
        _write_npz(path, damage({k: z[k] for k in z.files}))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = cached_vocabulary(bow_features, key, cfg, tmp_path)
    warned = warnings_of(caplog, BOW)
    assert len(warned) == 1 and str(path) in warned[0] and said in warned[0] and "rebuilding" in warned[0], warned
    assert np.array_equal(again.words, first.words) and np.array_equal(again.idf, first.idf)
    assert (again.power, again.n_images, again.n_descriptors) == (first.power, first.n_images, first.n_descriptors)
    with np.load(path, allow_pickle=False) as z:  # rewritten whole, and valid
        assert orb_bow.vocabulary_problem({k: z[k] for k in z.files}, cfg, len(bow_features)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cached_vocabulary(bow_features, key, cfg, tmp_path)
    assert not warnings_of(caplog, BOW) and any("cache hit" in r.getMessage() for r in caplog.records)


def test_tf_vocabulary_with_idf_weights_is_refitted(bow_features, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    cfg, key = BowConfig(vocabulary_size=32, kmeans_samples=1000, weighting="tf"), {"fingerprint": "tf"}
    cached_vocabulary(bow_features, key, cfg, tmp_path)
    path = vocabulary_cache_path(key, cfg, len(bow_features), tmp_path)
    with np.load(path, allow_pickle=False) as z:
        _write_npz(path, {**{k: z[k] for k in z.files}, "idf": np.full(32, 2.0, np.float32)})
    with caplog.at_level(logging.WARNING):
        again = cached_vocabulary(bow_features, key, cfg, tmp_path)
    assert len(warnings_of(caplog, BOW)) == 1 and "weighting=tf" in warnings_of(caplog, BOW)[0]
    assert (again.idf == 1).all()


SMALL_BOW = ["orb_bow.vocabulary_size=128", "orb_bow.kmeans_samples=20000", "orb_bow.kmeans_iters=10"]


@pytest.mark.parametrize("case", ["idf_of_the_wrong_length", "float_words", "array_valued_power"])
def test_damaged_vocabulary_cache_through_evaluate(case: str, tmp_path: Path, cache_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The red team's three damages at the cache's real name, through `evaluate.py method=orb_bow data=synth_tiny`:
    one warning, the vocabulary refitted, the same metrics; the dataset's files untouched."""
    from siamese_retrieval.evaluate import evaluate

    damage = dict((c[0], c[1]) for c in VOCABULARY_DAMAGE)[case]
    seen: list[Path] = []
    real = orb_bow.vocabulary_cache_path
    monkeypatch.setattr(orb_bow, "vocabulary_cache_path", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    overrides = ["logger=none", "method=orb_bow", "data=synth_tiny", *SMALL_BOW, f"orb_bow.seed={4242 + len(case)}"]
    first = evaluate(compose_config("eval", overrides, tmp_path / "first", cache_dir))
    path = seen[-1]
    assert path.parent == cache_dir and path.is_file()
    city = Path(first["dataset_root"])
    before = snapshot(city)
    with np.load(path, allow_pickle=False) as z:
        _write_npz(path, damage({k: z[k] for k in z.files}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = evaluate(compose_config("eval", overrides, tmp_path / "again", cache_dir))
    warned = warnings_of(caplog, BOW)
    assert len(warned) == 1 and str(path) in warned[0] and "rebuilding" in warned[0], warned
    assert again["metrics"] == first["metrics"]
    with np.load(path, allow_pickle=False) as z:
        assert z["words"].dtype == np.uint8 and z["idf"].shape == (128,) and z["power"].shape == ()
    assert snapshot(city) == before


# the ORB feature cache beside it (retrieval/orb_features.py, the features the vocabulary is fitted on): the same rule
FEATURES = "siamese_retrieval.retrieval.orb_features"
FEATURE_DAMAGE: list[tuple[str, NpzEdit, str]] = [
    ("float_offsets", _with(offsets=lambda x: x.astype(np.float64)), "has offsets of dtype float64"),
    ("offsets_not_from_zero", _with(offsets=lambda x: x + 1), "do not start at 0"),
    ("float64_points", _with(points=lambda x: x.astype(np.float64)), "has points of dtype float64"),
    ("float_descriptors", _with(desc=lambda x: x.astype(np.float32)), "has desc of dtype float32"),
    ("array_of_the_wrong_length", _with(angle=lambda x: x[:-1]), "has angle of dtype float32 and shape"),
    ("nan_frame_size", _with(wh=_nan_first), "non-finite wh"),
    ("pickled_points", lambda a: {**a, "points": np.array([None] * len(a["points"]), dtype=object)}, "is unreadable"),
]


@pytest.mark.parametrize("case,damage,said", FEATURE_DAMAGE, ids=[c[0] for c in FEATURE_DAMAGE])
def test_damaged_orb_feature_cache_is_rebuilt_with_one_warning(case: str, damage: NpzEdit, said: str, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from siamese_retrieval.retrieval.orb_features import cached_features
    from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig

    ds = make_dataset(tmp_path / "city", n_streets=1, per_street=3, queries_per_street=1)
    files, cfg, cache = ds.all_files(), OrbRansacConfig(n_features=100), tmp_path / "cache"
    first = cached_features(files, {"fingerprint": ds.fingerprint}, cfg, cache)
    (path,) = cache.glob("orb-*.npz")
    with np.load(path, allow_pickle=False) as z:
        _write_npz(path, damage({k: z[k] for k in z.files}))
    with caplog.at_level(logging.WARNING):
        again = cached_features(files, {"fingerprint": ds.fingerprint}, cfg, cache)
    warned = warnings_of(caplog, FEATURES)
    assert len(warned) == 1 and str(path) in warned[0] and said in warned[0] and "rebuilding" in warned[0], warned
    assert len(again) == len(first) and all(np.array_equal(a.desc, b.desc) for a, b in zip(again, first))


# ========================================================================================= 2. retrieve index cache

from siamese_retrieval.retrieve import retrieve  # noqa: E402

CACHE = "siamese_retrieval.retrieval.embedding_cache"


def _save_index(entry: Path, index: faiss.Index) -> None:
    faiss.write_index(index, str(entry / "index.faiss"))


def _flat(d: int, metric: str, x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(x, np.float32))
    return index


def _wrong_dimension(entry: Path, emb: np.ndarray, metric: str) -> None:  # the red team's case
    n, d = emb.shape
    _save_index(entry, _flat(d + 3, metric, np.random.default_rng(0).normal(size=(n, d + 3))))


def _wrong_dimension_both(entry: Path, emb: np.ndarray, metric: str) -> None:  # embeddings and index agree, wrongly
    n, d = emb.shape
    x = np.random.default_rng(0).normal(size=(n, d + 3)).astype(np.float32)
    np.save(entry / "embeddings.npy", x)
    _save_index(entry, _flat(d + 3, metric, x))


def _wrong_metric(entry: Path, emb: np.ndarray, metric: str) -> None:
    _save_index(entry, _flat(emb.shape[1], "ip" if metric == "l2" else "l2", emb))


def _wrong_count(entry: Path, emb: np.ndarray, metric: str) -> None:
    _save_index(entry, _flat(emb.shape[1], metric, emb[:-1]))


def _wrong_kind(entry: Path, emb: np.ndarray, metric: str) -> None:  # an IVF index where index=flat builds a flat one
    d = emb.shape[1]
    quantizer = _flat(d, metric, np.zeros((0, d), np.float32))
    index = faiss.IndexIVFFlat(quantizer, d, 2, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    index.train(emb)
    index.add(emb)
    _save_index(entry, index)


def _garbage_index(entry: Path, emb: np.ndarray, metric: str) -> None:
    (entry / "index.faiss").write_bytes(b"\x00" * 64)


def _float64_embeddings(entry: Path, emb: np.ndarray, metric: str) -> None:
    np.save(entry / "embeddings.npy", emb.astype(np.float64))


def _short_embeddings(entry: Path, emb: np.ndarray, metric: str) -> None:
    np.save(entry / "embeddings.npy", emb[:, :-1].copy())


def _nan_embeddings(entry: Path, emb: np.ndarray, metric: str) -> None:
    bad = emb.copy()
    bad[3, 1] = np.nan
    np.save(entry / "embeddings.npy", bad)


def _pickled_embeddings(entry: Path, emb: np.ndarray, metric: str) -> None:
    arr = np.empty(len(emb), dtype=object)
    arr[:] = [row for row in emb]
    np.save(entry / "embeddings.npy", arr, allow_pickle=True)


def _meta_a_list(entry: Path, emb: np.ndarray, metric: str) -> None:
    (entry / "meta.json").write_text("[]\n")


def _meta_of_another_key(entry: Path, emb: np.ndarray, metric: str) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["n_db"] += 1
    (entry / "meta.json").write_text(json.dumps(meta))


INDEX_DAMAGE: list[tuple[str, Callable[[Path, np.ndarray, str], None], str]] = [
    ("index_of_the_wrong_dimension", _wrong_dimension, "index has dimension"),
    ("embeddings_and_index_of_the_wrong_dimension", _wrong_dimension_both, "has embeddings of dtype float32 and shape"),
    ("index_of_the_other_metric", _wrong_metric, "index uses metric"),
    ("index_of_the_wrong_size", _wrong_count, "index holds"),
    ("index_of_another_kind", _wrong_kind, "is a IndexIVFFlat, not what index kind 'flat' builds"),
    ("index_not_a_faiss_file", _garbage_index, "is unreadable"),
    ("float64_embeddings", _float64_embeddings, "has embeddings of dtype float64"),
    ("embeddings_of_the_wrong_dimension", _short_embeddings, "has embeddings of dtype float32 and shape"),
    ("nan_embeddings", _nan_embeddings, "non-finite embeddings"),
    ("pickled_embeddings", _pickled_embeddings, "is unreadable"),
    ("meta_json_not_an_object", _meta_a_list, "does not match its key"),
    ("meta_json_of_another_key", _meta_of_another_key, "does not match its key"),
]


@pytest.fixture(scope="module")
def retrieve_case(tiny_checkpoint: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One retrieve over the tiny city with the tiny checkpoint: the ranking every damaged cache must give back."""
    query = sorted(cache_dir.glob("synth-*/query/images/*.jpg"))[0]
    log_dir = tmp_path_factory.mktemp("retrieve_damage")
    args = ["data=synth_tiny", f"ckpt_path={tiny_checkpoint}", f"query={query}", f"paths.log_dir={log_dir}",
            "top_k=10", "grid.dir=null", "output=json"]
    first = retrieve(compose_config("retrieve", args, log_dir / "retrieve", cache_dir))
    return {"args": args, "log_dir": log_dir, "first": first, "query": query, "ckpt": tiny_checkpoint}


def _ranking(result: dict) -> list[tuple[str, float]]:
    return [(r["path"], round(r["score"], 5)) for r in result["queries"][0]["results"]]


@pytest.mark.parametrize("case,damage,said", INDEX_DAMAGE, ids=[c[0] for c in INDEX_DAMAGE])
def test_damaged_index_cache_is_rebuilt_with_one_warning(case: str, damage, said: str, retrieve_case: dict,
                                                         cache_dir: Path, capsys: pytest.CaptureFixture,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    entry = Path(retrieve_case["first"]["cache_dir"])
    assert entry.parent == cache_dir / "index" and (entry / "index.faiss").is_file()
    emb = np.load(entry / "embeddings.npy", allow_pickle=False)
    metric = "l2" if faiss.read_index(str(entry / "index.faiss")).metric_type == faiss.METRIC_L2 else "ip"
    user_files = {p: file_hash(p) for p in (retrieve_case["ckpt"], retrieve_case["query"])}
    damage(entry, emb, metric)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = retrieve(compose_config("retrieve", retrieve_case["args"], retrieve_case["log_dir"] / "retrieve",
                                      cache_dir))
    capsys.readouterr()
    warned = warnings_of(caplog, CACHE)
    assert len(warned) == 1 and str(entry) in warned[0] and said in warned[0] and "rebuilding" in warned[0], warned
    assert not got["cache_hit"] and got["cache_dir"] == str(entry)  # embedded again, the entry rewritten
    assert _ranking(got) == _ranking(retrieve_case["first"])
    index = faiss.read_index(str(entry / "index.faiss"))
    rebuilt = np.load(entry / "embeddings.npy", allow_pickle=False)
    assert (index.d, index.ntotal) == (emb.shape[1], emb.shape[0]) and np.array_equal(rebuilt, emb)
    assert {p: file_hash(p) for p in user_files} == user_files
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_index_of_the_wrong_dimension_is_rebuilt_on_the_command_line(retrieve_case: dict, cache_dir: Path) -> None:
    """`retrieve.py` itself: the red team's index (right count, wrong dimension) no longer ends in FAISS' ValueError."""
    entry = Path(retrieve_case["first"]["cache_dir"])
    emb = np.load(entry / "embeddings.npy", allow_pickle=False)
    metric = "l2" if faiss.read_index(str(entry / "index.faiss")).metric_type == faiss.METRIC_L2 else "ip"
    _wrong_dimension(entry, emb, metric)
    proc = subprocess.run([sys.executable, str(ROOT / "retrieve.py"), *retrieve_case["args"]], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout)
    assert not shown["cache_hit"] and _ranking(shown) == _ranking(retrieve_case["first"])
    assert sum("embedding cache" in ln and "index has dimension" in ln for ln in proc.stderr.splitlines()) == 1
    assert faiss.read_index(str(entry / "index.faiss")).d == emb.shape[1]


# ========================================================================================= 3. convert


@pytest.fixture(scope="module")
def vpr_source(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny city in the VPR folder layout (data/synth/export.py)."""
    from siamese_retrieval.data.synth import SynthConfig, ensure_city
    from siamese_retrieval.data.synth.export import export_vpr_folder

    city = ensure_city(cache_dir, SynthConfig.from_preset("tiny"), workers=1)
    return export_vpr_folder(city, tmp_path_factory.mktemp("vpr") / "vpr", split="test")


def _rename_first_query(root: Path, fn: Callable[[str], str]) -> None:
    first = sorted((root / "images" / "test" / "queries").iterdir())[0]
    first.rename(first.with_name(fn(first.name)))


def _note(text: str) -> Callable[[str], str]:
    """The VPR name's `note` field (the 14th, last before the extension) set to `text`."""
    def rename(name: str) -> str:
        parts = name.split("@")
        parts[-2] = text
        return "@".join(parts)
    return rename


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "siamese_retrieval.data.convert", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# (case, how the source is damaged, where --out goes (src: the source root, tmp: the test's folder), extra
#  arguments, what is in --out beforehand, the substrings of the one error line)
CONVERT_REFUSALS: list[tuple[str, Callable[[Path], None] | None, Callable[[Path, Path], Path], list[str],
                             dict[str, bytes] | None, list[str]]] = [
    ("newline_in_a_file_name", lambda root: _rename_first_query(root, _note("night\nfog")),
     lambda src, tmp: tmp / "out", [], None,
     ["cannot be converted", "contains the control character U+000A", "\\n"]),
    ("backslash_in_a_file_name", lambda root: _rename_first_query(root, _note("a\\b")),
     lambda src, tmp: tmp / "out", [], None, ["cannot be converted", "a backslash in a file name"]),
    ("output_inside_the_source", None, lambda src, tmp: src / "converted", [], None, ["lies inside the source root"]),
    ("output_deep_inside_the_source", None, lambda src, tmp: src / "images" / "test" / "out", [], None,
     ["lies inside the source root"]),
    ("output_is_the_source", None, lambda src, tmp: src, ["--overwrite"], None, ["is the source root"]),
    ("output_holds_the_source", None, lambda src, tmp: src.parent, ["--overwrite"], None, ["holds the source root"]),
    ("non_empty_output", None, lambda src, tmp: tmp / "out", [], {"keep.txt": b"mine\n"},
     ["already exists and is not an empty folder", "--overwrite"]),
    ("newline_with_overwrite", lambda root: _rename_first_query(root, _note("night\nfog")),
     lambda src, tmp: tmp / "out", ["--overwrite"], {"keep.txt": b"mine\n"}, ["contains the control character"]),
    ("output_is_a_file", None, lambda src, tmp: tmp / "out", ["--overwrite"], b"a file\n",  # type: ignore[list-item]
     ["already exists and is not a folder"]),
]


@pytest.mark.parametrize("case,damage,where,extra,existing,said", CONVERT_REFUSALS,
                         ids=[c[0] for c in CONVERT_REFUSALS])
def test_convert_refuses_before_writing(case: str, damage, where, extra: list[str], existing, said: list[str],
                                        vpr_source: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "vpr"
    shutil.copytree(vpr_source, src)
    if damage is not None:
        damage(src)
    out = where(src, tmp_path)
    if isinstance(existing, bytes):
        out.write_bytes(existing)
    elif existing:
        out.mkdir(parents=True)
        for name, data in existing.items():
            (out / name).write_bytes(data)
    source_before = snapshot(tmp_path / "src")
    around_before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    out_before = snapshot(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    line = error_line(_convert("--layout", "vpr_folder", "--root", str(src), "--out", str(out), *extra))
    assert all(s in line for s in said), line
    assert snapshot(tmp_path / "src") == source_before  # the source byte-for-byte as it was
    now = snapshot(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    assert now == out_before  # nothing written: no output, or the old one untouched
    if out.parent.is_dir() and around_before is not None:
        assert sorted(p.name for p in out.parent.iterdir()) == around_before  # no temporary left beside it


def test_convert_overwrite_replaces_a_non_empty_output_once_complete(vpr_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "old" / "keep.txt").write_bytes(b"mine\n")
    source_before = snapshot(vpr_source)
    proc = _convert("--layout", "vpr_folder", "--root", str(vpr_source), "--out", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from siamese_retrieval.data.dataset import read_dataset

    ds = read_dataset(out, check="decode")
    assert ds.n_db == 120 and not (out / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old content removed, no temporary left
    assert snapshot(vpr_source) == source_before
    # converting again into the same (now non-empty) folder needs --overwrite again
    line = error_line(_convert("--layout", "vpr_folder", "--root", str(vpr_source), "--out", str(out)))
    assert "already exists and is not an empty folder" in line


def test_a_name_that_cannot_be_written_is_refused_before_the_staged_folder() -> None:
    """`check_output_names` alone: the reader's rules, and names the reader would read back differently."""
    from siamese_retrieval.data.convert import check_output_names

    ok = ["database/images/a.jpg", "query/images/sub/b.jpg"]
    check_output_names(ok, [Path("/x/a.jpg"), Path("/x/sub/b.jpg")])
    for bad, said in (("query/images/a\nb.jpg", "U+000A"), ("query/images/a\x7fb.jpg", "U+007F"),
                      ("query/images/a\\b.jpg", "backslash"), ("query/images/\udcff.jpg", "not valid UTF-8")):
        with pytest.raises(DatasetError) as err:
            check_output_names([bad], [Path("/src") / bad])
        assert said in str(err.value) and "cannot be converted" in str(err.value) and "\n" not in str(err.value)


# ========================================================================================= 4. image bombs


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit grayscale PNG of one colour: ~110 KB on disk, width x height bytes (900 MB) once decoded to 8-bit
    and 2.7 GB as RGB (3.5 GB at peak in read_image + to_rgb, measured). Written by hand (zlib), row by row."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_bytes() -> bytes:
    return png_bomb()


BOMB_LINE = "image is 30000 x 30000 = 900 Mpx, above data.max_image_pixels=50000000"


@pytest.fixture
def bomb_root(tmp_path: Path, bomb_bytes: bytes) -> Path:
    """A small valid dataset (as tests/helpers.py builds them, PNG images) whose second query is the bomb."""
    root = tmp_path / "city"
    ds = make_dataset(root, n_streets=2, per_street=3, queries_per_street=2, height=48, width=64, ext=".png")
    ds.query_file(1).write_bytes(bomb_bytes)
    return root


def test_the_bomb_is_small_and_its_header_says_its_size(bomb_bytes: bytes) -> None:
    from siamese_retrieval.image_header import image_size, pixel_problem

    assert len(bomb_bytes) < 500_000 and image_size(bomb_bytes) == (30000, 30000)
    assert pixel_problem(bomb_bytes) == BOMB_LINE
    assert pixel_problem(bomb_bytes, limit=900_000_000) is None  # exactly at the limit: allowed


def _encoded(ext: str) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, textured_image(np.random.default_rng(0), 48, 64))
    assert ok
    return buf.tobytes()


def _claiming(ext: str, width: int, height: int) -> bytes:
    """A small real image whose header claims `width` x `height` (the pixels stay the small image's)."""
    data = bytearray(_encoded(ext))
    if ext == ".bmp":  # BITMAPINFOHEADER: int32 width, height at bytes 18, 22
        data[18:26] = struct.pack("<ii", width, height)
    elif ext == ".jpg":  # the first SOFn frame header: P, height, width after its length
        i = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
        data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


HEADERS = [
    ("jpeg_claiming_30000_x_30000", lambda: _claiming(".jpg", 30000, 30000), BOMB_LINE),
    ("bmp_claiming_9000_x_9000", lambda: _claiming(".bmp", 9000, 9000),
     "image is 9000 x 9000 = 81 Mpx, above data.max_image_pixels=50000000"),
    ("bmp_above_pillows_own_limit", lambda: _claiming(".bmp", 20000, 20000),
     "image is above 178956970 pixels by its header, above data.max_image_pixels=50000000"),
    ("small_png", lambda: _encoded(".png"), None),
    ("small_jpeg", lambda: _encoded(".jpg"), None),
    ("small_webp", lambda: _encoded(".webp"), None),
    ("small_tiff", lambda: _encoded(".tiff"), None),
    ("text", lambda: b"hello, I am a text file\n", "not a decodable image"),
]


@pytest.mark.parametrize("case,data,said", HEADERS, ids=[c[0] for c in HEADERS])
def test_sizes_come_from_the_header_of_every_format(case: str, data, said: str | None) -> None:
    from siamese_retrieval.image_header import pixel_problem

    problem = pixel_problem(data())
    assert (problem is None) if said is None else (problem is not None and said in problem), problem


def _decoders(root: Path) -> dict[str, Callable[[], Any]]:
    """Every place a dataset or query image is decoded, each on the bomb."""
    from siamese_retrieval.data.dataset import check_image_files, read_dataset
    from siamese_retrieval.data.images import load_images, read_image, thumbnail
    from siamese_retrieval.data.keypoints import OrbConfig, extract_paths
    from siamese_retrieval.retrieval.orb_features import extract_features

    bomb = sorted((root / "query" / "images").iterdir())[1]
    return {
        "read_dataset_decode_check": lambda: read_dataset(root, check="decode"),
        "check_image_files": lambda: check_image_files([bomb], "decode"),
        "read_image": lambda: read_image(bomb),
        "load_images": lambda: load_images(read_dataset(root, check="none"), size=(32, 32), cache_dir=None, workers=1),
        "keypoints": lambda: extract_paths([bomb], OrbConfig(), workers=1),
        "orb_features": lambda: extract_features([bomb], workers=1),
        "thumbnail": lambda: thumbnail(bomb),
    }


DECODERS = ["read_dataset_decode_check", "check_image_files", "read_image", "load_images", "keypoints",
            "orb_features", "thumbnail"]


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_refuses_the_bomb_by_its_header(decoder: str, bomb_root: Path) -> None:
    bomb = sorted((bomb_root / "query" / "images").iterdir())[1]
    before = snapshot(bomb_root)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatasetError) as err:
        _decoders(bomb_root)[decoder]()
    message = str(err.value)
    assert f"{bomb}: {BOMB_LINE}" in message and "\n" not in message, message
    # decoding it would take >= 900 MB (3.5 GB at peak): the high-water mark of this process did not move by that
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 300e6
    assert snapshot(bomb_root) == before


def test_the_picture_tile_of_a_bomb_is_grey_never_decoded(bomb_root: Path) -> None:
    from siamese_retrieval.drawing import thumb

    bomb = sorted((bomb_root / "query" / "images").iterdir())[1]
    tile = thumb(bomb, (32, 24))
    assert tile.shape == (24, 32, 3) and (tile == 128).all()


def test_the_limit_is_a_setting(bomb_root: Path) -> None:
    from siamese_retrieval.data.images import read_image

    small = sorted((bomb_root / "query" / "images").iterdir())[0]  # 64 x 48 = 3072 pixels
    assert read_image(small).shape[:2] == (48, 64)
    with image_pixel_limit(3071):
        with pytest.raises(DatasetError, match=r"image is 64 x 48 = 0 Mpx, above data.max_image_pixels=3071"):
            read_image(small)
    assert read_image(small, max_pixels=3072).shape[:2] == (48, 64)
    with pytest.raises(ConfigError, match=r"data.max_image_pixels=0: must be an integer >= 1"):
        read_image(small, max_pixels=0)


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.errors import DatasetError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_dataset(sys.argv[1], check="decode")
    except DatasetError as exc:
        print(exc)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_refusing_the_bomb_costs_no_memory_in_a_fresh_process(bomb_root: Path) -> None:
    """In a process of its own (whose high-water mark nothing else raised): the bomb's check adds < 100 MB."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(bomb_root)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, grown_kb = proc.stdout.strip().splitlines()
    assert BOMB_LINE in message
    assert int(grown_kb) * 1024 < 100e6, grown_kb


def _run_measured(args: list[str], tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    """`args` run to completion, and its own peak RSS in bytes (os.wait4: this child's rusage alone)."""
    with open(tmp_path / "stdout", "w+") as out, open(tmp_path / "stderr", "w+") as err:
        child = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT, env=env, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, child.returncode, out.read(), err.read()), usage.ru_maxrss * 1024


@pytest.mark.parametrize("entry", ["retrieve_query", "evaluate_dataset"])
def test_the_bomb_is_one_line_and_exit_2_on_the_command_line(entry: str, bomb_root: Path, tiny_checkpoint: Path,
                                                             cache_dir: Path, tmp_path: Path) -> None:
    """retrieve.py with the bomb as its query (data.max_image_pixels reaches the query decoder), evaluate.py on a
    dataset holding it: `error: <path>: image is 30000 x 30000 = 900 Mpx, ...`, exit 2, the process never near
    the GBs a decode takes."""
    bomb = sorted((bomb_root / "query" / "images").iterdir())[1]
    before = snapshot(bomb_root)
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}
    if entry == "retrieve_query":
        args = [sys.executable, str(ROOT / "retrieve.py"), "data=synth_tiny", f"ckpt_path={tiny_checkpoint}",
                f"query={bomb}", f"paths.log_dir={tmp_path / 'logs'}", "grid.dir=null"]
    else:
        args = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={tiny_checkpoint}", "data=msls_city",
                f"data.root={bomb_root}", "split=all", "logger=none",
                f"hydra.run.dir={tmp_path / 'run'}"]
    proc, peak = _run_measured(args, tmp_path, env)
    line = error_line(proc)
    assert f"{bomb}: {BOMB_LINE}" in line, line
    assert peak < 2.5e9, peak  # torch and the model: well under 2.5 GB; the decode alone: 3.5 GB at peak
    assert snapshot(bomb_root) == before


def test_the_config_carries_the_limit(tmp_path: Path, cache_dir: Path) -> None:
    from siamese_retrieval.configs import check_config

    cfg = compose_config("eval", ["data=vpr_folder", "data.root=/x"], tmp_path, cache_dir)
    assert cfg.data.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS  # inherited from conf/data/synth.yaml
    for bad in ("0", "-5", "abc", "1.5", "true"):
        with pytest.raises(ConfigError, match=r"^data.max_image_pixels=.*: must be an integer >= 1"):
            check_config(compose_config("eval", ["data=synth_tiny", f"data.max_image_pixels={bad}"], tmp_path,
                                        cache_dir), "eval")


def test_a_small_limit_from_the_config_reaches_the_reader(tmp_path: Path, cache_dir: Path) -> None:
    """data.max_image_pixels=1000 refuses the tiny city's own images (256 x 192) through the datamodule."""
    from siamese_retrieval.data.datamodule import build_datamodule, evaluation_data_config
    from siamese_retrieval.data.inputs import ImageInputs

    cfg = compose_config("eval", ["data=synth_tiny", "data.max_image_pixels=1000"], tmp_path, cache_dir)
    dm = build_datamodule(evaluation_data_config(cfg.data), ImageInputs(height=16, width=16))  # as retrieve.py
    dm.prepare_data()
    with pytest.raises(DatasetError, match=r"image is \d+ x \d+ = 0 Mpx, above data.max_image_pixels=1000"):
        dm.read(check="decode")
