"""Write a dataset from another on-disk layout into the project's own format (the dataset contract).

    python -m siamese_retrieval.data.convert --layout vpr_folder --root SRC --out DST [--split test] [--radius 25]
    python -m siamese_retrieval.data.convert --layout msls_official --root SRC --out DST [--city london] [--radius 25]
        [--max-heading DEG] [--include-panos] [--link] [--check decode|exists|none]

DST gets database/images/..., query/images/..., database/database.json, query/query.json and gt.h5, with
image paths relative to DST. Images are copied by default; `--link` makes symbolic links to the source images
instead (no copy), which leave DST: read such a root with data.follow_symlinks_outside_root=true
(read_dataset(..., follow_symlinks_outside_root=True)). DST must be new or empty; it is written under a
temporary name and renamed when complete, so an interrupted conversion leaves nothing that looks like a dataset.
Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np

from siamese_retrieval.data.dataset import RetrievalDataset, read_dataset, write_dataset
from siamese_retrieval.data.layouts import DEFAULT_RADIUS_M, LAYOUTS, read_layout
from siamese_retrieval.errors import UserError
from siamese_retrieval.io_utils import ensure_folder, normal_dir_mode, safe_remove


@contextlib.contextmanager
def staged_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a private temporary sibling folder of `out` (a random name made by mkdtemp: never an existing name
    or a planted link); rename it onto `out` only if the block succeeds.

    `out` must not exist or be an empty folder (UserError otherwise): nothing already there is overwritten,
    and a symbolic link under `out` is refused, never followed.
    """
    out = Path(out).expanduser()
    if os.path.islink(out):
        raise UserError(f"{out}: is a symbolic link (to {os.readlink(out)}); choose a new output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    ensure_folder(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        normal_dir_mode(tmp)  # mkdtemp makes 0700; the dataset gets normal permissions
        if os.path.isdir(out) and not os.path.islink(out):
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)  # rename(2) never follows a link that appeared under `out` meanwhile (it fails)
    finally:
        safe_remove(tmp, ignore_errors=True)


def output_names(paths: Sequence[str], kind: str) -> list[str]:
    """Contract paths for one split: `<kind>/images/` + each path relative to the split's deepest common folder
    (the file names, or the sub-folders under it where images are nested)."""
    parents = [os.path.dirname(p) for p in paths]
    common = os.path.commonpath(parents) if all(parents) else ""
    return [f"{kind}/images/{PurePosixPath(p).relative_to(common) if common else PurePosixPath(p)}" for p in paths]


def _place(job: tuple[Path, Path, bool]) -> None:
    src, dst, link = job
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(os.path.realpath(src), dst)
    else:
        shutil.copyfile(src, dst)


def write_converted(dataset: RetrievalDataset, out: str | Path, *, link: bool = False, workers: int = 4) -> Path:
    """Write `dataset` (from any reader) into `out` in the contract format; images copied, or linked with `link`."""
    db_names, q_names = output_names(dataset.db_paths, "database"), output_names(dataset.q_paths, "query")
    with staged_output_dir(out) as tmp:
        jobs = [(dataset.db_file(i), tmp / n, link) for i, n in enumerate(db_names)]
        jobs += [(dataset.query_file(i), tmp / n, link) for i, n in enumerate(q_names)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(_place, jobs))
        if dataset.is_sparse:  # too large for the dense arrays: the sparse gt.h5 layout (data/dataset.py)
            write_dataset(tmp, db_names, dataset.db_loc, q_names, dataset.q_loc, None, None, sparse=dataset.relevance)
        else:
            write_dataset(tmp, db_names, dataset.db_loc, q_names, dataset.q_loc, dataset.sim, dataset.fov)
    return Path(out).expanduser()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m siamese_retrieval.data.convert",
                                     description="Convert a dataset layout into the project's format.")
    parser.add_argument("--layout", required=True, choices=[n for n in LAYOUTS.names() if n != "contract"])
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
    else:
        options.update(city=args.city, exclude_panos=not args.include_panos)
    try:
        dataset = read_layout(args.layout, args.root, **options)
        out = write_converted(dataset, args.out, link=args.link)
        written = read_dataset(out, check="none", follow_symlinks_outside_root=args.link)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, unwritable output folder: one line too
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
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
