"""Hostile and malformed dataset roots: every fault is ONE DatasetError line naming the file and what is
wrong; the valid oddities next to them (a PNG named .jpg, bytes after a JPEG's end marker, fov = 1.0,
links that stay inside the root) are accepted.

Each case copies one small pristine root, breaks it with `build(root, outside)` (`outside` is a folder
next to the root, out of it) and either expects the message substrings (`{root}` and `{outside}` are
filled in) or, with `OK`, a dataset that reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import cv2
import h5py
import numpy as np
import pytest

from siamese_retrieval.data.dataset import read_dataset, write_gt
from siamese_retrieval.errors import DatasetError
from tests.conftest import ROOT
from tests.helpers import make_dataset, textured_image

OK = None  # expected message of a valid input: it must read back
DB, Q, GT = "database/database.json", "query/query.json", "gt.h5"
N_DB, N_Q = 6, 4  # 2 streets x 3 database images, 2 queries each
IMG = "database/images/s00_001.jpg"  # database entry 1
Q_IMG = "query/images/s01_000.jpg"  # query entry 2


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "city"
    make_dataset(root, n_streets=2, per_street=3, queries_per_street=2, height=48, width=64)
    return root


# ----------------------------------------------------------------------------------------- building blocks


def edit_json(root: Path, rel: str, fn: Callable[[dict], Any]) -> None:
    path = root / rel
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def set_key(rel: str, key: str, value: Any) -> Callable[[Path, Path], None]:
    return lambda root, outside: edit_json(root, rel, lambda m: m.__setitem__(key, value))


def set_item(rel: str, key: str, index: int, value: Any) -> Callable[[Path, Path], None]:
    return lambda root, outside: edit_json(root, rel, lambda m: m[key].__setitem__(index, value))


def write_bytes(rel: str, data: bytes) -> Callable[[Path, Path], None]:
    return lambda root, outside: (root / rel).write_bytes(data)


def encoded(ext: str, **params: int) -> bytes:
    img = textured_image(np.random.default_rng(1), 48, 64)
    flags = []
    for name, value in params.items():
        flags += [getattr(cv2, name), value]
    ok, buf = cv2.imencode(ext, img, flags)
    assert ok
    return buf.tobytes()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def gt_with(**datasets: Callable[[h5py.File, np.ndarray, np.ndarray], None]) -> Callable[[Path, Path], None]:
    """Rewrite gt.h5 with each named entry made by fn(file, sim, fov) (the others written normally)."""

    def build(root: Path, outside: Path) -> None:
        ds = read_dataset(root, check="none")
        (root / GT).unlink()
        with h5py.File(root / GT, "w") as f:
            for key, arr in (("sim", ds.sim.astype(np.uint8)), ("fov", ds.fov)):
                if key in datasets:
                    datasets[key](f, ds.sim, ds.fov)
                else:
                    f.create_dataset(key, data=arr)

    return build


def gt_values(sim: Callable[[np.ndarray], np.ndarray] | None = None,
              fov: Callable[[np.ndarray], np.ndarray] | None = None) -> Callable[[Path, Path], None]:
    def build(root: Path, outside: Path) -> None:
        ds = read_dataset(root, check="none")
        write_gt(root / GT, sim(ds.sim.copy()) if sim else ds.sim, fov(ds.fov.copy()) if fov else ds.fov)

    return build


def symlink(rel: str, target: Callable[[Path, Path], Path | str]) -> Callable[[Path, Path], None]:
    """Replace root/rel (a file or nothing) by a symbolic link to target(root, outside)."""

    def build(root: Path, outside: Path) -> None:
        link, to = root / rel, target(root, outside)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_file() or link.is_symlink():
            link.unlink()
        link.symlink_to(to)

    return build


def image_outside(root: Path, outside: Path) -> Path:
    """A valid image out of the root (what a link leading out would expose)."""
    outside.mkdir(exist_ok=True)
    shutil.copy(root / IMG, outside / "secret.jpg")
    return outside / "secret.jpg"


def folder_link(rel_folder: str, to_outside: bool) -> Callable[[Path, Path], None]:
    """root/rel_folder -> a folder (outside, or elsewhere inside) holding a copy of IMG; entry 1 points into it."""

    def build(root: Path, outside: Path) -> None:
        target = outside / "photos" if to_outside else root / "elsewhere" / "photos"
        target.mkdir(parents=True)
        shutil.copy(root / IMG, target / "x.jpg")
        (root / rel_folder).symlink_to(target, target_is_directory=True)
        edit_json(root, DB, lambda m: m["im_paths"].__setitem__(1, f"{rel_folder}/x.jpg"))

    return build


def chain(*builds: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def build(root: Path, outside: Path) -> None:
        for b in builds:
            b(root, outside)

    return build


def duplicate(rel: str, i: int, j: int, spelling: Callable[[str], str] = lambda p: p) -> Callable[[Path, Path], None]:
    return lambda root, outside: edit_json(root, rel, lambda m: m["im_paths"].__setitem__(j, spelling(m["im_paths"][i])))


def with_prefix(root: Path, outside: Path) -> None:
    """im_prefix "database/" with entries 1 and 4 both naming images/s00_001.jpg once the prefix is applied."""

    def fn(m: dict) -> None:
        m["im_prefix"] = "database/"
        m["im_paths"] = [p.removeprefix("database/") for p in m["im_paths"]]
        m["im_paths"][4] = "./" + m["im_paths"][1]

    edit_json(root, DB, fn)


# ----------------------------------------------------------------------------------------- the table


CASES: list[tuple[str, Callable[[Path, Path], None], tuple[str, ...] | None, dict]] = [
    # --- links out of the root
    ("symlink_file_outside", symlink(IMG, image_outside),
     (DB, f"im_paths[1] ('{IMG}') resolves to {{outside}}/secret.jpg", "outside the dataset root {root}",
      "follow_symlinks_outside_root"), {}),
    ("symlink_query_outside", symlink(Q_IMG, image_outside), (Q, f"im_paths[2] ('{Q_IMG}')", "{outside}/secret.jpg"), {}),
    ("symlink_folder_outside", folder_link("database/linked", True),
     (DB, "im_paths[1] ('database/linked/x.jpg') resolves to {outside}/photos/x.jpg"), {}),
    ("symlink_dangling_outside", symlink(IMG, lambda root, outside: outside / "gone.jpg"),
     (DB, "im_paths[1]", "{outside}/gone.jpg", "outside the dataset root"), {}),
    ("symlink_chain_inside_then_out", chain(symlink("database/hop.jpg", image_outside),
                                            symlink(IMG, lambda root, outside: root / "database" / "hop.jpg")),
     (DB, "im_paths[1]", "{outside}/secret.jpg"), {}),
    ("symlink_relative_up_to_system", chain(symlink("database/up", lambda root, outside: "../" * 40),
                                            set_item(DB, "im_paths", 3, "database/up/etc/hostname")),
     (DB, "im_paths[3] ('database/up/etc/hostname') resolves to /etc/hostname"), {"check": "none"}),
    ("symlink_outside_refused_even_unchecked", symlink(IMG, image_outside), (DB, "im_paths[1]", "outside"),
     {"check": "none"}),
    # --- duplicates
    ("duplicate_in_database", duplicate(DB, 1, 4), (DB, f"im_paths[1] and im_paths[4] are the same image '{IMG}'"), {}),
    ("duplicate_in_queries", duplicate(Q, 0, 3), (Q, "im_paths[0] and im_paths[3] are the same image"), {}),
    ("duplicate_spelled_differently", duplicate(DB, 2, 5, lambda p: "./" + p.replace("/", "//")),
     (DB, "im_paths[2] and im_paths[5] are the same image"), {}),
    ("duplicate_after_im_prefix", with_prefix, (DB, f"im_paths[1] and im_paths[4] are the same image '{IMG}'"), {}),
    # --- images: decoded, whatever the name says
    ("jpeg_cut_in_half", write_bytes(IMG, half(encoded(".jpg"))), (IMG, "truncated JPEG"), {}),
    ("progressive_jpeg_cut", write_bytes(IMG, encoded(".jpg", IMWRITE_JPEG_PROGRESSIVE=1)[:-300]),
     (IMG, "truncated JPEG"), {}),
    ("jpeg_without_end_marker", write_bytes(IMG, encoded(".jpg")[:-2]), (IMG, "truncated JPEG"), {}),
    ("png_cut_in_half", write_bytes(IMG, half(encoded(".png"))), (IMG, "truncated PNG"), {}),
    ("random_bytes", write_bytes(Q_IMG, np.random.default_rng(3).integers(0, 256, 4000, np.uint8).tobytes()),
     (Q_IMG, "not a decodable image"), {}),
    ("text_file_as_jpg", write_bytes(IMG, b"hello, I am a text file\n"), (IMG, "not a decodable image"), {}),
    ("empty_image", write_bytes(IMG, b""), (IMG, "image file is empty (0 bytes)"), {}),
    ("bmp_cut_in_half", write_bytes(IMG, half(encoded(".bmp"))), (IMG, "not a decodable image"), {}),
    ("image_missing", lambda root, outside: (root / IMG).unlink(), (IMG, "image not found"), {}),
    ("image_is_a_folder", lambda root, outside: ((root / IMG).unlink(), (root / IMG).mkdir()),
     (IMG, "image not found"), {}),
    ("missing_with_check_exists", lambda root, outside: (root / IMG).unlink(), ("image(s) not found", IMG),
     {"check": "exists"}),
    ("unknown_check_mode", lambda root, outside: None, ("unknown image check 'pixels'",), {"check": "pixels"}),
    # --- gt.h5 types
    ("sim_is_a_group", gt_with(sim=lambda f, s, v: f.create_group("sim").create_dataset("x", data=s)),
     (GT, "sim is an HDF5 group, expected a dataset"), {}),
    ("fov_is_a_group", gt_with(fov=lambda f, s, v: f.create_group("fov")), (GT, "fov is an HDF5 group"), {}),
    ("fov_string_dtype", gt_with(fov=lambda f, s, v: f.create_dataset("fov", data=v.astype(str).astype(object),
                                                                      dtype=h5py.string_dtype())),
     (GT, "fov must be numeric", "found dtype string"), {}),
    ("fov_fixed_bytes_dtype", gt_with(fov=lambda f, s, v: f.create_dataset("fov", data=v.astype("S8"))),
     (GT, "fov must be numeric", "found dtype string"), {}),
    ("sim_compound_dtype", gt_with(sim=lambda f, s, v: f.create_dataset(
        "sim", data=np.zeros(s.shape, dtype=[("a", "u1"), ("b", "f4")]))), (GT, "sim must be numeric"), {}),
    ("sim_1d", gt_with(sim=lambda f, s, v: f.create_dataset("sim", data=s.ravel().astype(np.uint8))),
     (GT, "sim must be 2-D (n_query, n_database), found 1-D shape (24,)"), {}),
    ("sim_3d", gt_with(sim=lambda f, s, v: f.create_dataset("sim", data=s[None].astype(np.uint8))),
     (GT, "sim must be 2-D", "3-D shape (1, 4, 6)"), {}),
    ("sim_scalar", gt_with(sim=lambda f, s, v: f.create_dataset("sim", data=1)), (GT, "sim must be 2-D", "0-D"), {}),
    ("fov_transposed", gt_with(fov=lambda f, s, v: f.create_dataset("fov", data=v.T)),
     (GT, "fov has shape (6, 4), expected (n_query, n_database) = (4, 6)"), {}),
    ("sim_external_link", gt_with(sim=lambda f, s, v: f.__setitem__("sim", h5py.ExternalLink("/tmp/other.h5", "/sim"))),
     (GT, "sim is an external link to /tmp/other.h5:/sim"), {}),
    ("sim_dangling_soft_link", gt_with(sim=lambda f, s, v: f.__setitem__("sim", h5py.SoftLink("/nowhere"))),
     (GT, "sim is a link to nothing (/nowhere)"), {}),
    ("sim_not_binary", gt_values(sim=lambda s: s.astype(np.uint8) * 2), (GT, "sim must be binary (0/1)"), {}),
    ("fov_above_one", gt_values(fov=lambda v: np.where(v > 0, v, 1.0001)), (GT, "fov must lie in [0, 1]"), {}),
    ("gt_not_hdf5", write_bytes(GT, b'{"sim": [[1]]}'), (GT, "not a readable HDF5 file"), {}),
    ("gt_empty_file", write_bytes(GT, b""), (GT, "not a readable HDF5 file"), {}),
    ("gt_cut_in_half", lambda root, outside: (root / GT).write_bytes(half((root / GT).read_bytes())),
     (GT, "not a readable HDF5 file"), {}),
    # --- JSON types
    ("json_is_a_list", write_bytes(DB, b'["database/images/s00_000.jpg"]'),
     (DB, "expected a JSON object with keys im_paths and loc, found a list"), {}),
    ("json_is_a_string", write_bytes(Q, b'"query"'), (Q, "found a string"), {}),
    ("json_invalid", write_bytes(DB, b'{"im_paths": ['), (DB, "not valid JSON", "line 1 column"), {}),
    ("json_invalid_utf8", write_bytes(Q, b'{"im_paths": ["caf\xe9.jpg"], "loc": [[0, 0]]}'),
     (Q, "not UTF-8 text: byte 0xe9 at offset 18"), {}),
    ("json_nested_too_deeply", write_bytes(DB, b"[" * 100_000 + b"]" * 100_000), (DB, "nested too deeply"), {}),
    ("im_prefix_a_number", set_key(DB, "im_prefix", 7), (DB, "im_prefix must be a string, found a number: 7"), {}),
    ("im_prefix_a_list", set_key(Q, "im_prefix", ["query/"]), (Q, "im_prefix must be a string, found a list"), {}),
    ("im_paths_a_string", set_key(DB, "im_paths", "database/images"),
     (DB, "im_paths must be a list of strings, found a string"), {}),
    ("im_paths_a_dict", set_key(Q, "im_paths", {"0": "a.jpg"}),
     (Q, "im_paths must be a list of strings, found an object"), {}),
    ("im_paths_item_a_number", set_item(DB, "im_paths", 2, 42), (DB, "im_paths[2] is not a non-empty string: 42"), {}),
    ("im_paths_item_null", set_item(Q, "im_paths", 1, None), (Q, "im_paths[1] is not a non-empty string: null"), {}),
    ("im_paths_item_empty", set_item(DB, "im_paths", 0, ""), (DB, "im_paths[0] is not a non-empty string"), {}),
    ("im_paths_item_newline", set_item(DB, "im_paths", 3, "database/a\nb.jpg"),
     (DB, "im_paths[3] contains the control character U+000A"), {}),
    ("im_paths_item_nul", set_item(DB, "im_paths", 3, "database/a\x00.jpg"),
     (DB, "im_paths[3] contains the control character U+0000"), {"check": "none"}),
    ("loc_row_too_long", set_item(DB, "loc", 1, [1.0, 2.0, 3.0, 4.0]),
     (DB, "loc[1] must be a row of 2 or 3 numbers", "found 4 values"), {}),
    ("loc_row_too_short", set_item(Q, "loc", 0, [1.0]),
     (Q, "loc[0] must be a row of 2 or 3 numbers", "found 1 value:"), {}),
    ("loc_row_a_number", set_key(DB, "loc", list(range(N_DB))), (DB, "loc[0] must be a row", "found a number: 0"), {}),
    ("loc_value_a_string", set_item(DB, "loc", 2, ["12.5", 3.0, 0.0]), (DB, "loc[2][0] is not a number: \"12.5\""), {}),
    ("loc_value_a_boolean", set_item(Q, "loc", 3, [1.0, True, 0.0]), (Q, "loc[3][1] is not a number: true"), {}),
    ("loc_value_null", set_item(Q, "loc", 1, [1.0, 2.0, None]), (Q, "loc[1][2] is not a number: null"), {}),
    ("loc_value_nan", set_item(DB, "loc", 4, [float("nan"), 0.0, 0.0]), (DB, "loc[4][0] is not a finite number"), {}),
    ("loc_value_huge_int", set_item(DB, "loc", 5, [10**400, 0, 0]), (DB, "loc[5][0] is not a finite number"), {}),
    ("loc_not_a_list", set_key(Q, "loc", None),
     (Q, "loc must be a list of [east, north(, heading)] rows, found null"), {}),
    ("loc_shorter_than_im_paths", lambda root, outside: edit_json(root, DB, lambda m: m["loc"].pop()),
     (DB, f"im_paths has {N_DB} entries but loc has {N_DB - 1}"), {}),
    # --- valid oddities: accepted
    ("ok_png_named_jpg", write_bytes(IMG, encoded(".png")), OK, {}),
    ("ok_jpeg_with_trailing_bytes", write_bytes(IMG, encoded(".jpg") + b"\x00camera trailer\xff\xd8" * 20), OK, {}),
    ("ok_png_with_trailing_bytes", write_bytes(Q_IMG, encoded(".png") + b"junk after IEND"), OK, {}),
    ("ok_progressive_and_restart_markers", chain(write_bytes(IMG, encoded(".jpg", IMWRITE_JPEG_PROGRESSIVE=1)),
                                                 write_bytes(Q_IMG, encoded(".jpg", IMWRITE_JPEG_RST_INTERVAL=1))), OK, {}),
    ("ok_fov_exactly_zero_and_one", gt_values(fov=lambda v: (v > 0.5).astype(np.float32)), OK, {}),
    ("ok_sim_bool_fov_float64", gt_with(sim=lambda f, s, v: f.create_dataset("sim", data=s.astype(bool)),
                                        fov=lambda f, s, v: f.create_dataset("fov", data=v.astype(np.float64))), OK, {}),
    ("ok_symlink_inside_to_inside", chain(lambda root, outside: shutil.copy(root / IMG, root / "database" / "real.jpg"),
                                          symlink(IMG, lambda root, outside: "../real.jpg")), OK, {}),
    ("ok_symlinked_folder_inside", folder_link("database/linked", False), OK, {}),
    ("ok_outside_link_when_allowed", symlink(IMG, image_outside), OK, {"follow_symlinks_outside_root": True}),
    ("ok_folder_outside_when_allowed", folder_link("database/linked", True), OK, {"follow_symlinks_outside_root": True}),
    ("ok_loc_rows_of_two", set_key(DB, "loc", [[float(i), 0.0] for i in range(N_DB)]), OK, {}),
    ("ok_im_prefix_null", set_key(DB, "im_prefix", None), OK, {}),
    ("ok_utf8_bom", lambda root, outside: (root / Q).write_bytes(b"\xef\xbb\xbf" + (root / Q).read_bytes()), OK, {}),
    ("ok_truncated_image_unchecked", write_bytes(IMG, half(encoded(".jpg"))), OK, {"check": "exists"}),
]


@pytest.mark.parametrize("build, expected, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_dataset(build, expected, kwargs, pristine: Path, tmp_path: Path) -> None:
    root, outside = tmp_path / "city", tmp_path / "outside"
    shutil.copytree(pristine, root, symlinks=True)
    build(root, outside)
    if expected is OK:
        ds = read_dataset(root, **kwargs)
        assert (ds.n_db, ds.n_query) == (N_DB, N_Q)
        assert ds.sim.shape == ds.fov.shape == (N_Q, N_DB)
        return
    with pytest.raises(DatasetError) as info:
        read_dataset(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, repr(message)
    for needle in expected:
        needle = needle.format(root=root, outside=outside)
        assert needle in message, (needle, message)


def test_case_table_is_big_enough() -> None:
    bad = [c for c in CASES if c[2] is not OK]
    assert len(bad) >= 30 and len(CASES) - len(bad) >= 8
    assert len({c[0] for c in CASES}) == len(CASES)


def test_allowed_outside_link_reads_the_linked_image(pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "city"
    shutil.copytree(pristine, root, symlinks=True)
    symlink(IMG, image_outside)(root, tmp_path / "outside")
    ds = read_dataset(root, follow_symlinks_outside_root=True)
    assert ds.db_file(1).resolve() == (tmp_path / "outside" / "secret.jpg").resolve()


# ----------------------------------------------------------------------------------------- end to end


E2E = {
    "symlink_file_outside": ("im_paths[1]", "outside the dataset root"),
    "png_cut_in_half": (IMG, "truncated PNG"),
}


# symlink_file_outside: -m slow; the command line's one line is png_cut_in_half's, the refusal is tested above
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c == "symlink_file_outside" else [])
                                  for c in E2E])
def test_bad_dataset_through_evaluate_py(case: str, pristine: Path, tmp_path: Path) -> None:
    """The real command line: exit code 2, stderr exactly one non-empty `error:` line, no traceback."""
    root, outside = tmp_path / "city", tmp_path / "outside"
    shutil.copytree(pristine, root, symlinks=True)
    build = next(c[1] for c in CASES if c[0] == case)
    build(root, outside)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SIAMESE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "evaluate.py", "method=orb_ransac", "data=msls_city", f"data.root={root}",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in E2E[case]:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "run" / "metrics.json").exists()
