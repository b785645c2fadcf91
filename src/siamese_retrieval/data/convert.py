"""Write a dataset from another on-disk layout into the project's own format (the dataset contract).

    python -m siamese_retrieval.data.convert --layout vpr_folder --root SRC --out DST [--split test] [--radius 25]
    python -m siamese_retrieval.data.convert --layout msls_official --root SRC --out DST [--city london] [--radius 25]
        [--max-heading DEG] [--include-panos] [--link] [--check decode|exists|none] [--overwrite]
    python -m siamese_retrieval.data.convert --layout gsv_cities --root SRC --out DST [--cities London,Boston]
    python -m siamese_retrieval.data.convert --layout contract --root CITY --out DST --to gsv_cities [--min-images 4]
        (a dataset of the project's format, e.g. a synthetic city, written in the GSV-Cities layout)

DST gets database/images/..., query/images/..., database/database.json, query/query.json and gt.h5, with
image paths relative to DST. Images are copied by default; `--link` makes symbolic links to the source images
instead (no copy), which leave DST: read such a root with data.follow_symlinks_outside_root=true
(read_dataset(..., follow_symlinks_outside_root=True)). DST must be new or empty (`--overwrite`: a non-empty DST
is replaced, but only once the new dataset is complete), and neither inside the source root nor holding it. It is
written under a temporary name, read back, and renamed when complete, so an interrupted or refused conversion
leaves nothing that looks like a dataset. Every output name is checked against the reader's rules (no control
characters, no backslashes, ...) before anything is written. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np

from siamese_retrieval.data.dataset import (
    RetrievalDataset,
    contract_relpath,
    read_dataset,
    relpath_problem,
    write_dataset,
)
from siamese_retrieval.data.layouts import DEFAULT_RADIUS_M, LAYOUTS, read_layout
from siamese_retrieval.errors import DatasetError, UserError
from siamese_retrieval.io_utils import ensure_folder, normal_dir_mode, safe_remove


@contextlib.contextmanager
def staged_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a private temporary sibling folder of `out` (a random name made by mkdtemp: never an existing name
    or a planted link); rename it onto `out` only if the block succeeds.

    `out` must not exist or be an empty folder (UserError otherwise): nothing already there is overwritten,
    and a symbolic link under `out` is refused, never followed. With `overwrite`, a non-empty folder `out` is
    replaced, only once the block has succeeded (until then it stays as it was).
    """
    check_output_folder(out, overwrite, hint="")  # no "--overwrite" hint: the synth exports have no such flag
    out = Path(out).expanduser()
    ensure_folder(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        yield tmp
        normal_dir_mode(tmp)  # mkdtemp makes 0700; the dataset gets normal permissions
        if os.path.isdir(out) and not os.path.islink(out):
            if any(out.iterdir()):  # overwrite (checked above): moved aside, removed once the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old)  # onto the empty folder mkdtemp made
            else:
                out.rmdir()
        try:
            os.replace(tmp, out)  # rename(2) never follows a link that appeared under `out` meanwhile (it fails)
        except OSError:
            if old is not None and not os.path.lexists(out):
                os.replace(old, out)  # the old content back where it was
                old = None
            raise
    finally:
        safe_remove(tmp, ignore_errors=True)
        if old is not None:
            safe_remove(old, ignore_errors=True)


def _shown(path: object) -> str:
    """A path in an error line: as it is, or quoted with its control characters escaped (one line)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def one_line(message: str) -> str:
    """`message` with control characters (a newline in a file name, ...) escaped: an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def check_output_place(root: str | Path, out: str | Path) -> None:
    """The output folder lies neither in the source root (it would add files to the source) nor around it (a
    non-empty output folder holding the source: --overwrite would delete the source). Real paths (links
    followed) are compared."""
    src, dst = os.path.realpath(Path(root).expanduser()), os.path.realpath(Path(out).expanduser())
    if dst == src:
        raise UserError(f"--out {_shown(out)} is the source root {_shown(root)}; choose a folder outside it")
    if dst.startswith(src.rstrip(os.sep) + os.sep):
        raise UserError(f"--out {_shown(out)} lies inside the source root {_shown(root)} (it would add files to the "
                        "source); choose a folder outside it")
    if src.startswith(dst.rstrip(os.sep) + os.sep):
        raise UserError(f"--out {_shown(out)} holds the source root {_shown(root)}; choose a folder outside it")


def check_output_folder(out: str | Path, overwrite: bool, hint: str = " (or pass --overwrite to replace it)") -> None:
    """Before reading the source: `out` is new, an empty folder, or (with `overwrite`) a folder; never a link or a
    file. `staged_output_dir` checks them again when it starts (hint "": not every caller has --overwrite)."""
    out = Path(out).expanduser()
    if os.path.islink(out):
        raise UserError(f"{_shown(out)}: is a symbolic link (to {_shown(os.readlink(out))}); choose a new output "
                        "folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{_shown(out)}: already exists and is not a folder; choose a new output folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{_shown(out)}: already exists and is not an empty folder; choose a new output folder{hint}")


def check_output_names(names: Sequence[str], sources: Sequence[Path]) -> None:
    """Every name the conversion would write (`names`, from `sources`) is one the dataset reader accepts and reads
    back as written: checked before anything is written, so a name the reader refuses (a control character in a
    file name, a backslash, ...) is one DatasetError naming the source file, never an unreadable output."""
    for name, src in zip(names, sources):
        problem = relpath_problem(name)
        if problem is None and contract_relpath(name) != name:
            problem = f"would be read back as {contract_relpath(name)!r} (a backslash in a file name)"
        if problem is not None:
            raise DatasetError(f"{_shown(src)}: cannot be converted: its path in the dataset format {problem}; "
                               "rename the file")
    seen: dict[str, Path] = {}
    for name, src in zip(names, sources):
        first = seen.setdefault(name, src)
        if first is not src:
            raise DatasetError(f"{_shown(src)} and {_shown(first)} would both be written as {name!r}")


def output_names(paths: Sequence[str], kind: str) -> list[str]:
    """Contract paths for one split: `<kind>/images/` + each path relative to the split's deepest common folder
    (the file names, or the sub-folders under it where images are nested)."""
    parents = [os.path.dirname(p) for p in paths]
    common = os.path.commonpath(parents) if all(parents) else ""
    return [f"{kind}/images/{PurePosixPath(p).relative_to(common) if common else PurePosixPath(p)}" for p in paths]


def _place_images(sources: Sequence[Path], targets: Sequence[Path], link: bool, workers: int = 4) -> None:
    """Copy each source image to its target (with `link`: a symbolic link to its real path), `workers` at a time."""
    def place(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(os.path.realpath(src), dst)
        else:
            shutil.copyfile(src, dst)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(place, sources, targets))


def write_converted(dataset: RetrievalDataset, out: str | Path, *, link: bool = False, workers: int = 4,
                    overwrite: bool = False) -> Path:
    """Write `dataset` (from any reader) into `out` in the contract format; images copied, or linked with `link`.
    Every output name is checked first (`check_output_names`); the staged result is read back before it is renamed
    onto `out` (with `overwrite`, replacing a non-empty `out` only then)."""
    db_names, q_names = output_names(dataset.db_paths, "database"), output_names(dataset.q_paths, "query")
    sources = [dataset.db_file(i) for i in range(dataset.n_db)]
    sources += [dataset.query_file(i) for i in range(dataset.n_query)]
    check_output_names(db_names + q_names, sources)
    with staged_output_dir(out, overwrite=overwrite) as tmp:
        _place_images(sources, [tmp / n for n in db_names + q_names], link, workers)
        # a sparse dataset (no sim/fov: too large for the dense arrays) keeps the sparse gt.h5 layout (data/dataset.py)
        write_dataset(tmp, db_names, dataset.db_loc, q_names, dataset.q_loc, dataset.sim, dataset.fov,
                      sparse=dataset.relevance if dataset.is_sparse else None)
        read_dataset(tmp, check="none", follow_symlinks_outside_root=link)  # readable, or nothing is renamed
    return Path(out).expanduser()


def gsv_places(dataset: RetrievalDataset, min_images: int = 4) -> list[tuple[int, list[int]]]:
    """(query, its database images) per GSV-Cities place: each query with its positives not yet in an earlier
    place (a database image belongs to one place), kept when the place has at least `min_images` images."""
    from siamese_retrieval.data.ground_truth import as_ground_truth

    truth, every = as_ground_truth(dataset), np.arange(dataset.n_db)[None, :]
    taken = np.zeros(dataset.n_db, bool)
    places = []
    for q in range(dataset.n_query):
        sim, _ = truth.lookup(np.array([q]), every)
        db = [int(j) for j in np.flatnonzero(sim[0] & ~taken)]
        if 1 + len(db) >= min_images:
            taken[db] = True
            places.append((q, db))
    return places


def write_gsv_cities(dataset: RetrievalDataset, out: str | Path, *, city: str = "Synth", min_images: int = 4,
                     link: bool = False, overwrite: bool = False, lat0: float = 45.0) -> Path:
    """`dataset` in the GSV-Cities layout (data/gsv_cities.py): one place per query (`gsv_places`), the query its
    oldest image. East / north metres become lat / lon about (lat0, 0) (equirectangular, the reader's inverse),
    headings northdeg; panoid and dates are made up (a place's images are its query, then one per month)."""
    from siamese_retrieval.data.gsv_cities import COLUMNS, EARTH_RADIUS_M, image_name

    places = gsv_places(dataset, min_images)
    if not places:
        raise DatasetError(f"{dataset.root}: no query with {min_images - 1} positives to make a GSV-Cities place of")
    city_id = city.lower()
    rows, sources = [], []
    for place_id, (q, db) in enumerate(places):
        members = [(dataset.query_file(q), dataset.q_loc[q])] + [(dataset.db_file(j), dataset.db_loc[j]) for j in db]
        for k, (src, (east, north, heading)) in enumerate(members):
            lat = lat0 + math.degrees(north / EARTH_RADIUS_M)
            lon = math.degrees(east / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
            rows.append({"place_id": str(place_id), "year": str(2000 + k // 12), "month": str(k % 12 + 1),
                         "northdeg": str(int(heading) % 360), "city_id": city_id, "lat": str(round(lat, 7)),
                         "lon": str(round(lon, 7)), "panoid": f"p{place_id:06d}x{k:03d}"})
            sources.append(src)
    names = [f"Images/{city}/{image_name(r)}" for r in rows]
    check_output_names(names, sources)
    with staged_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "Dataframes").mkdir()
        with open(tmp / "Dataframes" / f"{city}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
        _place_images(sources, [tmp / n for n in names], link)
        read_layout("gsv_cities", tmp, check="none", follow_symlinks_outside_root=link,
                    min_images_per_place=min_images)  # readable, or nothing is renamed
    return Path(out).expanduser()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m siamese_retrieval.data.convert",
                                     description="Convert a dataset layout into the project's format.")
    parser.add_argument("--layout", required=True, choices=LAYOUTS.names(),
                        help="the source's layout (contract: the project's own format, e.g. a synthetic city)")
    parser.add_argument("--to", default="contract", choices=("contract", "gsv_cities"),
                        help="the layout to write (default: the project's format; gsv_cities: GSV-Cities' Dataframes/ + "
                             "Images/, one place per query and its positives)")
    parser.add_argument("--cities", default=None, help="gsv_cities source: comma-separated cities (default all)")
    parser.add_argument("--min-images", type=int, default=4,
                        help="gsv_cities: images a place needs (default 4, as GSV-Cities)")
    parser.add_argument("--root", required=True, help="the source dataset's root folder")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--split", default=None, help="vpr_folder: train | val | test (default test)")
    parser.add_argument("--city", default=None, help="msls_official: the train_val city (default: the only one)")
    parser.add_argument("--radius", type=float, default=DEFAULT_RADIUS_M,
                        help="positive radius in metres (default 25: both benchmarks' evaluation threshold; 10 is "
                             "their training threshold)")
    parser.add_argument("--max-heading", type=float, default=None,
                        help="also require headings within this many degrees (off by default, as in both benchmarks)")
    parser.add_argument("--include-panos", action="store_true",
                        help="msls_official: keep panoramas (the official code leaves them out)")
    parser.add_argument("--link", action="store_true",
                        help="symlink the images instead of copying them (then read with "
                             "data.follow_symlinks_outside_root=true)")
    parser.add_argument("--check", default="exists", choices=("decode", "exists", "none"),
                        help="how the source images are checked before writing (default exists)")
    parser.add_argument("--name", default="", help="dataset name (default: the split or city)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder (only once the new dataset is complete)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options: dict = {"radius_m": args.radius, "max_heading_deg": args.max_heading, "check": args.check,
                     "name": args.name}
    wrong = ([f"--{o}" for o, v in (("city", args.city), ("include-panos", args.include_panos)) if v]
             if args.layout == "vpr_folder" else (["--split"] if args.split is not None else []))
    if wrong:
        print(f"error: {', '.join(wrong)} does not apply to --layout {args.layout}", file=sys.stderr)
        return 2
    if args.layout == "vpr_folder":
        options["split"] = args.split or "test"
    elif args.layout == "msls_official":
        options.update(city=args.city, exclude_panos=not args.include_panos)
    elif args.layout == "gsv_cities":
        options = {"cities": args.cities.split(",") if args.cities else None, "min_images_per_place": args.min_images,
                   "check": args.check, "name": args.name}
    else:  # a layout without radius options (contract, or one of your own)
        options = {"check": args.check, **({"name": args.name} if args.name else {})}
    if args.to == "gsv_cities" and args.layout == "gsv_cities":
        print("error: --layout gsv_cities --to gsv_cities: the source is already in that layout", file=sys.stderr)
        return 2
    try:
        check_output_place(args.root, args.out)
        check_output_folder(args.out, args.overwrite)
        dataset = read_layout(args.layout, args.root, **options)
        if args.to == "gsv_cities":
            out = write_gsv_cities(dataset, args.out, min_images=args.min_images, link=args.link,
                                   overwrite=args.overwrite)
            written = read_layout("gsv_cities", out, check="none", follow_symlinks_outside_root=args.link,
                                  min_images_per_place=args.min_images)
            print(f"wrote {written.root}: {written.n_query} places, {written.n_db + written.n_query} images")
            print(f"read it with: data=gsv_cities data.root={written.root}")
            return 0
        out = write_converted(dataset, args.out, link=args.link, overwrite=args.overwrite)
        written = read_dataset(out, check="none", follow_symlinks_outside_root=args.link)
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, unwritable output folder: one line too
        print(f"error: {one_line(f'{exc.filename or args.out}: {exc.strerror or exc}')}", file=sys.stderr)
        return 2
    n_pos = written.relevance.n_positives(np.arange(written.n_query))
    print(f"wrote {written.root}: {written.n_db} database, {written.n_query} queries, "
          f"{n_pos.mean():.2f} positives per query, {(n_pos == 0).sum()} queries without a positive")
    read_with = "data=msls_city data.root=" + str(written.root)
    if args.link:
        read_with += " data.follow_symlinks_outside_root=true  (the images are links out of the root)"
    print(f"read it with: {read_with}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
