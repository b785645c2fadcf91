"""The Optuna sweeper's sqlite storage, checked before the sweeper opens it: a file that cannot hold a study is
one line and exit code 2, and is left exactly as it is (read only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from siamese_retrieval.errors import fail, one_line


def sqlite_path(storage: Any) -> Path | None:
    """The database file of an SQLAlchemy sqlite URL (`sqlite:///rel/x.db`, `sqlite:////abs/x.db`), or None
    (another backend, in memory, not a string)."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return None
    path = storage[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLE = "version_info"  # every Optuna RDB storage has it (optuna/storages/_rdb/models.py)


def check_sweeper_storage(config: DictConfig) -> None:
    """Exit 2 with one line when `hydra.sweeper.storage` is an sqlite file that cannot hold the study, before
    the sweeper opens it (SQLAlchemy would end the sweep in a traceback, or write Optuna's tables into
    someone else's database). The file is only read, never changed. Also run by OutputDirCheck (cli.py) before
    it claims the sweep directory, so a refused sweep leaves nothing behind."""
    try:
        path = sqlite_path(OmegaConf.select(config, "hydra.sweeper.storage", default=None))
    except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved: the sweeper reports it
        return
    problem = sqlite_storage_problem(path) if path is not None else None
    if problem is not None:
        if path.is_symlink():
            path = f"{path} (a symbolic link to {os.readlink(path)})"
        fail(f"hydra.sweeper.storage: {path} {problem}; it was left as it is: move it away, or set "
             f"hydra.sweeper.storage=sqlite:///<another file> (a new file starts a new study)")


def sqlite_storage_problem(path: Path) -> str | None:
    """Why the sqlite file `path` cannot hold an Optuna study, else None: missing (a new study), empty (sqlite
    makes it a new database), or an intact SQLite database that is empty or Optuna's. Read only: the file is
    opened by sqlite in read-only mode."""
    import sqlite3
    import stat
    from urllib.parse import quote

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "leads nowhere (its target does not exist)" if path.is_symlink() else None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not an SQLite database file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return None
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if header != SQLITE_HEADER:
        return "is not an SQLite database (it does not start with the SQLite header)"
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            check = con.execute("PRAGMA quick_check").fetchall()
            tables = [str(r[0]) for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"is a damaged SQLite database ({exc}: truncated or overwritten?)"
    if check != [("ok",)]:
        first = one_line(check[0][0]) if check and check[0] else "?"
        return f"is a damaged SQLite database (integrity check: {first})"
    if tables and OPTUNA_TABLE not in tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        return f"is an SQLite database of something else (tables {shown}; no Optuna study storage)"
    return None
