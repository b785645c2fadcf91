"""Caches in a SHARED cache folder, where another user can plant symbolic links (red-team report).

For every cache kind reachable with small fixtures, links are planted at the cache's final name and at its
temporary names (a correctly guessed random name, and the old predictable `.<name>.tmp-<pid>`), pointing into a
victim folder outside the cache folder; the real code path is run. Whatever happens, nothing is written in the
victim (byte-identical, no new files), and the run either succeeds with the cache rebuilt as a real file or
folder inside the cache folder, or refuses with one line naming the path.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from siamese_retrieval import io_utils
from siamese_retrieval.errors import UserError
from tests.helpers import make_dataset, textured_image

GUESS = "guessed"  # the random part of a temporary name an attacker guessed right (tempfile is made to try it first)


# ----------------------------------------------------------------------------------------- the victim


def make_victim(root: Path) -> Path:
    victim = root / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_bytes(b"do not touch\n")
    (victim / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return victim


def snapshot(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under `folder` (links not followed): its type and bytes (a link: its target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p).encode())
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


# ----------------------------------------------------------------------------------------- the cache kinds


@dataclass
class Kind:
    name: str
    kind: str  # "file" | "dir": what the final cache entry is
    suffix: str  # a file cache's temporary suffix (mkstemp: .<name>.<random>.tmp<suffix>)
    build: Callable[[Path, Path], Path]  # (cache folder, fixtures folder) -> the final path (after a run)
    final: Callable[[Path, Path], Path]  # (cache folder, fixtures folder) -> the final path (before a run)
    refuses: bool = True  # an unremovable planted link: UserError (False: the cache is skipped, the run goes on)


def _small_dataset(fixtures: Path):
    root = fixtures / "ds"
    if (root / "gt.h5").exists():
        from siamese_retrieval.data.dataset import read_dataset

        return read_dataset(root, check="none")
    return make_dataset(root, n_streets=1, per_street=4, queries_per_street=2, height=64, width=96)


def _tiny_city_cfg():
    from siamese_retrieval.data.synth import SynthConfig

    return replace(SynthConfig.from_preset("tiny"), n_streets=1, queries_per_street=3)


def city_final(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.data.synth.generate import city_dir

    return city_dir(cache, _tiny_city_cfg())


def city_build(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.data.synth import ensure_city

    root = ensure_city(cache, _tiny_city_cfg(), workers=1)
    read_dataset(root, check="exists")
    return root


def images_final(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.data.images import images_cache_file

    return images_cache_file(_small_dataset(fixtures), (32, 48), cache)


def images_build(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.data.images import load_images

    ds = _small_dataset(fixtures)
    db, q = load_images(ds, (32, 48), cache, workers=1)
    want_db, _ = load_images(ds, (32, 48), None, workers=1)
    np.testing.assert_array_equal(db, want_db)
    return images_final(cache, fixtures)


def keypoints_final(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.data.keypoints import OrbConfig, keypoints_cache_file

    return keypoints_cache_file(_small_dataset(fixtures), OrbConfig(), cache)


def keypoints_build(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.data.keypoints import OrbConfig, extract_dataset_keypoints

    extract_dataset_keypoints(_small_dataset(fixtures), OrbConfig(), cache, workers=1)
    return keypoints_final(cache, fixtures)


def _only(cache: Path, pattern: str) -> Path:
    found = [p for p in cache.glob(pattern) if not p.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


def _probe_name(build: Callable[[Path, Path], Path], fixtures: Path) -> str:
    """The final name of a cache whose name is a digest: built once in a scratch folder (the name does not
    depend on the cache folder)."""
    scratch = fixtures / "probe"
    shutil.rmtree(scratch, ignore_errors=True)
    return build(scratch, fixtures).name


def _orb_files(fixtures: Path) -> list[Path]:
    ds = _small_dataset(fixtures)
    return [ds.root / p for p in ds.db_paths + ds.q_paths]


def orb_build(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.retrieval.orb_features import OrbFeatureConfig, cached_features

    files = _orb_files(fixtures)
    feats = cached_features(files, {"fingerprint": "fp"}, OrbFeatureConfig(n_features=100), cache, 1)
    assert len(feats) == len(files)
    return _only(cache, "orb-*.npz")


def orb_final(cache: Path, fixtures: Path) -> Path:
    return cache / _probe_name(orb_build, fixtures)


def _bow_features():
    from siamese_retrieval.retrieval.orb_features import OrbFeatureConfig, image_features

    cfg = OrbFeatureConfig(n_features=200)
    return [image_features(textured_image(np.random.default_rng(10 + i), 96, 128), cfg) for i in range(6)]


def vocabulary_build(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.retrieval.orb_bow import BowConfig, cached_vocabulary

    vocab = cached_vocabulary(_bow_features(), {"fingerprint": "fp"}, BowConfig(vocabulary_size=16, kmeans_samples=500),
                              cache)
    assert vocab.words.shape == (16, 32)
    return _only(cache, "orb_bow-*.npz")


def vocabulary_final(cache: Path, fixtures: Path) -> Path:
    return cache / _probe_name(vocabulary_build, fixtures)


def _verifier_data():
    from siamese_retrieval.retrieval import verifier_fit as vf

    return vf.TrainData([], [], [], [], np.array([0]), np.array([0]), None, {"fingerprint": "fp"})


def verifier_build(cache: Path, fixtures: Path) -> Path:
    """learned_matches.fit_or_load, the training itself replaced by a fresh network (the cache's code path)."""
    from siamese_retrieval.retrieval import learned_matches as lm
    from siamese_retrieval.retrieval import verifier_fit as vf

    cfg = lm.LearnedMatchesConfig()
    fit = vf.fit
    vf.fit = lambda data, cfg, log_dir=None: (lm.MatchNet(cfg.network), {})
    try:
        net = vf.fit_or_load(_verifier_data(), cfg, cache)
    finally:
        vf.fit = fit
    assert isinstance(net, lm.MatchNet)
    return vf.cache_path(_verifier_data(), cfg, cache)


def verifier_final(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.retrieval import learned_matches as lm
    from siamese_retrieval.retrieval import verifier_fit as vf

    return vf.cache_path(_verifier_data(), lm.LearnedMatchesConfig(), cache)


def _checkpoint(fixtures: Path) -> Path:
    ckpt = fixtures / "model.ckpt"
    if not ckpt.exists():
        ckpt.write_bytes(b"not a real checkpoint: only its bytes are hashed")
    return ckpt


def index_build(cache: Path, fixtures: Path) -> Path:
    from siamese_retrieval.retrieval.embedding_cache import cached_database_index
    from siamese_retrieval.retrieval.index import IndexConfig

    dataset = SimpleNamespace(fingerprint="fp", root=fixtures, db_paths=[f"db/{i}.jpg" for i in range(6)], n_db=6)
    emb = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    got = cached_database_index(cache, _checkpoint(fixtures), dataset, {"inputs": "x"}, IndexConfig(), lambda: emb)
    assert got.embeddings.shape == (6, 8) and got.index.ntotal == 6
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.is_dir() else []
    assert len(entries) == 1, entries
    return entries[0]


def index_final(cache: Path, fixtures: Path) -> Path:
    return cache / _probe_name(index_build, fixtures)


KINDS = {k.name: k for k in [
    Kind("city", "dir", "", city_build, city_final),
    Kind("images", "dir", "", images_build, images_final),
    Kind("keypoints", "dir", "", keypoints_build, keypoints_final),
    Kind("orb_features", "file", ".npz", orb_build, orb_final),
    Kind("vocabulary", "file", ".npz", vocabulary_build, vocabulary_final),
    Kind("verifier_weights", "file", ".pt", verifier_build, verifier_final),
    Kind("index_and_embeddings", "dir", "", index_build, index_final, refuses=False),
]}


# ----------------------------------------------------------------------------------------- where links are planted


def temp_names(k: Kind, final: Path, guess: str) -> list[str]:
    if k.kind == "dir":  # io_utils.make_temp_dir: .<name>.tmp-<random>-<pid>
        return [f".{final.name}.tmp-{guess}-{os.getpid()}"]
    return [f".{final.name}.{guess}.tmp{k.suffix}"]  # io_utils.atomic_file / atomic_path: mkstemp


def plant(place: str, k: Kind, final: Path, victim: Path, fixtures: Path) -> list[Path]:
    """Plant the links of `place`; returns them."""
    def link(at: Path, to: Path) -> Path:
        at.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(to, at)
        return at

    if place == "final_to_victim":  # a dir cache -> the victim folder, a file cache -> a victim file
        return [link(final, victim if k.kind == "dir" else victim / "precious.txt")]
    if place == "final_dangling":  # -> a name that does not exist yet in the victim
        return [link(final, victim / "new_entry")]
    if place == "final_to_valid_copy":  # -> a valid cache of the same key, moved into the victim: never read
        scratch = fixtures / "valid"
        shutil.rmtree(scratch, ignore_errors=True)
        built = k.build(scratch, fixtures)
        os.replace(built, victim / "valid_copy")
        return [link(final, victim / "valid_copy")]
    if place == "guessed_temp":  # the random temporary name, guessed: to the victim folder and to a new name
        names = temp_names(k, final, GUESS)
        return [link(final.parent / n, victim) for n in names] + [
            link(final.parent / n.replace(GUESS, GUESS + "2"), victim / "new_entry") for n in names]
    if place == "old_predictable_temp":  # the names of the old code: .<name>.tmp-<pid> (and without the dot)
        return [link(final.parent / f".{final.name}.tmp-{os.getpid()}", victim),
                link(final.parent / f".{final.name}.tmp-{os.getpid()}.npz", victim / "new_entry")]
    raise ValueError(place)


# verifier_fit.fit_or_load (not io_utils) reads its cache: `path.is_file()` then torch.load, both following a
# link. Its write (io_utils.atomic_path) is safe: the rename replaces the link, nothing is written in the victim.
# Fix (in verifier_fit.py): io_utils.check_cache_entry(path, "learned verifier", "file")
# before `path.is_file()`, and pickle.UnpicklingError among load_weights' caught exceptions.
PLACES = ["final_to_victim", "final_dangling", "final_to_valid_copy", "guessed_temp", "old_predictable_temp"]


@pytest.fixture
def guessed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """tempfile tries `GUESS` (then `GUESS2`) first: as if an attacker had guessed the random names."""
    monkeypatch.setattr(tempfile, "_get_candidate_names",
                        lambda: itertools.chain([GUESS, GUESS + "2"], tempfile._RandomNameSequence()))


def _assert_real_entry(k: Kind, final: Path, cache: Path) -> None:
    assert not final.is_symlink(), f"{final} is still a link"
    assert (final.is_dir() if k.kind == "dir" else final.is_file()), final
    assert os.path.realpath(final) == os.path.join(os.path.realpath(cache), final.name)


# ----------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_planted_links_are_never_followed(kind: str, place: str, tmp_path: Path, guessed_names,
                                          caplog: pytest.LogCaptureFixture) -> None:
    k = KINDS[kind]
    fixtures, cache = tmp_path / "fixtures", tmp_path / "cache"
    fixtures.mkdir()
    victim = make_victim(tmp_path)
    final = k.final(cache, fixtures)
    assert not os.path.lexists(final)
    links = plant(place, k, final, victim, fixtures)
    before = snapshot(victim)

    with caplog.at_level(logging.INFO):
        built = k.build(cache, fixtures)

    assert snapshot(victim) == before  # nothing written, changed or removed in the victim
    assert built == final
    _assert_real_entry(k, final, cache)
    if place.startswith("final"):
        if kind != "verifier_weights":  # (its read is verifier_fit's own: no warning)
            assert "symbolic link" in caplog.text
        assert "cache hit" not in caplog.text
    else:
        for planted in links:  # a temporary-name link is never used: left as it was (or, unfollowed, unlinked)
            assert not os.path.lexists(planted) or planted.is_symlink()
    leftovers = [p for p in cache.iterdir() if p.name.startswith(".") and p not in links and not p.is_symlink()]
    assert not leftovers, leftovers  # our own temporaries are gone

    with caplog.at_level(logging.INFO):  # and the rebuilt cache is used by the next run
        caplog.clear()
        assert k.build(cache, fixtures) == final
    assert snapshot(victim) == before


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_link_that_cannot_be_removed_is_one_line_or_skipped(kind: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Another user's link in a sticky folder can be neither unlinked nor renamed over (EPERM): refused with one
    line naming it (the index cache: skipped with a warning, the search goes on), never followed."""
    k = KINDS[kind]
    fixtures, cache = tmp_path / "fixtures", tmp_path / "cache"
    fixtures.mkdir()
    victim = make_victim(tmp_path)
    final = k.final(cache, fixtures)
    # (the verifier's weights: a link to a new name, which verifier_fit's own read does not open; see above)
    plant("final_dangling" if kind == "verifier_weights" else "final_to_victim", k, final, victim, fixtures)
    before = snapshot(victim)
    real = {name: getattr(os, name) for name in ("unlink", "replace", "rename")}

    def sticky(name: str, target_arg: int):
        def call(*args, **kwargs):  # the sticky bit: another user's entry can be neither unlinked nor renamed over
            if os.fspath(args[target_arg]) == str(final):
                raise PermissionError(1, "Operation not permitted", str(final))
            return real[name](*args, **kwargs)
        return call

    monkeypatch.setattr(os, "unlink", sticky("unlink", 0))
    monkeypatch.setattr(os, "replace", sticky("replace", 1))
    monkeypatch.setattr(os, "rename", sticky("rename", 1))
    if k.refuses:
        with pytest.raises(UserError) as err:
            k.build(cache, fixtures)
        message = str(err.value)
        assert "\n" not in message and str(final) in message and "symbolic link" in message
    else:
        with caplog.at_level(logging.WARNING):
            k.build(cache, fixtures)
        assert "without the cache" in caplog.text and str(final) in caplog.text
    assert final.is_symlink() and snapshot(victim) == before


# ----------------------------------------------------------------------------------------- the helpers


def test_temporary_names_are_random_and_exclusive(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "thing"
    a, b = io_utils.make_temp_dir(final), io_utils.make_temp_dir(final)
    assert a != b and a.parent == b.parent == final.parent
    for t in (a, b):
        random_part = t.name[len(f".{final.name}.tmp-"):].rsplit("-", 1)[0]
        assert len(random_part) >= 8 and t.name != f".{final.name}.tmp-{os.getpid()}"
        assert t.stat().st_mode & 0o777 == 0o700  # private until published
    names = []
    for _ in range(2):
        with io_utils.atomic_path(tmp_path / "cache" / "file.npz", suffix=".npz") as tmp:
            names.append(tmp.name)
            tmp.write_bytes(b"x")
    assert names[0] != names[1] and all(str(os.getpid()) not in n for n in names)


def test_safe_remove_never_follows(tmp_path: Path) -> None:
    victim = make_victim(tmp_path)
    before = snapshot(victim)
    cache = tmp_path / "cache"
    real = cache / "real_dir"
    (real / "nested").mkdir(parents=True)
    os.symlink(victim, real / "link_inside")
    os.symlink(victim / "precious.txt", real / "nested" / "file_link")
    os.symlink(victim, cache / "dir_link")
    os.symlink(victim / "precious.txt", cache / "file_link")
    os.symlink(victim / "nothing", cache / "dangling")
    for p in (real, cache / "dir_link", cache / "file_link", cache / "dangling", cache / "missing"):
        io_utils.safe_remove(p)
        assert not os.path.lexists(p)
    assert snapshot(victim) == before


def test_rmtree_refuses_a_link_and_safe_remove_unlinks_it(tmp_path: Path) -> None:
    """Why a helper: shutil.rmtree(link) raises (and with ignore_errors=True, as the old code called it, silently
    leaves the link in place, so the next mkdir(exist_ok=True) went through it)."""
    victim = make_victim(tmp_path)
    before = snapshot(victim)
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(OSError):
        shutil.rmtree(tmp_path / "link")
    shutil.rmtree(tmp_path / "link", ignore_errors=True)
    assert (tmp_path / "link").is_symlink()
    io_utils.safe_remove(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link") and snapshot(victim) == before


def test_a_cache_folder_that_is_another_users_link_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A folder the code creates inside the cache folder (retrieve's `index/`) planted as another user's link:
    not written through (protected_symlinks' rule: links of others are followed only when they own the folder
    holding it). The link's owner is faked: tests cannot create links as another user."""
    victim = make_victim(tmp_path)
    before = snapshot(victim)
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(victim, cache / "index")
    lstat = os.lstat

    def foreign_lstat(path, *args, **kwargs):
        st = lstat(path, *args, **kwargs)
        if os.fspath(path) == str(cache / "index"):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, 4242, st.st_gid, st.st_size,
                                   st.st_atime, st.st_mtime, st.st_ctime))
        return st

    monkeypatch.setattr(os, "lstat", foreign_lstat)
    with pytest.raises(UserError, match="symbolic link made by another user") as err:
        io_utils.ensure_folder(cache / "index")
    assert "\n" not in str(err.value)
    from siamese_retrieval.retrieval.embedding_cache import cached_database_index
    from siamese_retrieval.retrieval.index import IndexConfig

    with caplog.at_level(logging.WARNING):
        dataset = SimpleNamespace(fingerprint="fp", root=tmp_path, db_paths=["a.jpg", "b.jpg"], n_db=2)
        got = cached_database_index(cache / "index", _checkpoint(tmp_path), dataset, {}, IndexConfig(),
                                    lambda: np.eye(2, 4, dtype=np.float32))
    assert not got.hit and got.directory is None and "embeds again" in caplog.text
    assert snapshot(victim) == before
    monkeypatch.undo()
    assert io_utils.ensure_folder(cache / "index") == cache / "index"  # one's own link: followed as before


def test_convert_output_that_is_a_link_is_refused(tmp_path: Path) -> None:
    from siamese_retrieval.data.convert import staged_output_dir

    victim = make_victim(tmp_path)
    empty = tmp_path / "empty_victim"
    empty.mkdir()
    before = snapshot(victim)
    os.symlink(empty, tmp_path / "out")
    os.symlink(victim, tmp_path / f".out.tmp-{os.getpid()}")  # the old predictable temporary
    with pytest.raises(UserError, match="symbolic link") as err:
        with staged_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    assert "\n" not in str(err.value)
    with staged_output_dir(tmp_path / "out2") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out2" / "x").is_file() and not (tmp_path / "out2").is_symlink()
    assert snapshot(victim) == before and not list(empty.iterdir())
