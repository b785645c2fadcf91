"""Quiet logs, visible progress, pictures people read.

The progress helper counts (from worker threads too) when forced on and is silent when off; a default
`train.py` run prints no third-party INFO line, no Lightning tip, no W&B warning, Lightning's model summary once,
and with SIAMESE_PROGRESS=1 a progress line per long step; the recall curve's chance line; grid sizes.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from rich.console import Console

from siamese_retrieval.parallel import chunked_map
from siamese_retrieval.progress import counted, progress, progress_enabled
from tests.conftest import ROOT
from tests.helpers import make_dataset

# ----------------------------------------------------------------------------------------- progress


def test_progress_counts_every_item_from_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIAMESE_PROGRESS", "1")
    out = io.StringIO()
    seen = []
    with progress("scoring queries", total=37, console=Console(file=out, width=120)) as advance:
        chunked_map(counted(lambda chunk: seen.extend(chunk), advance), list(range(37)), workers=3, max_chunk=4)
    assert sorted(seen) == list(range(37))
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("scoring queries") and "37/37" in lines[0]


def test_progress_is_a_cheap_no_op_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIAMESE_PROGRESS", "0")
    assert not progress_enabled()
    out = io.StringIO()
    work = lambda chunk: len(chunk)  # noqa: E731
    with progress("decoding images", total=10, console=Console(file=out, width=120)) as advance:
        assert counted(work, advance) is work  # nothing wrapped: no per-chunk cost
        advance(10)
    assert out.getvalue() == ""
    monkeypatch.delenv("SIAMESE_PROGRESS")  # unset: on only when stderr is a terminal (pytest captures it)
    assert progress_enabled() == sys.stderr.isatty()
    with progress("nothing to do", total=0, console=Console(file=out), enabled=True) as advance:
        advance(1)
    assert out.getvalue() == ""


def test_model_summary_is_lightnings_imported_on_first_use() -> None:
    """conf/callbacks' `siamese_retrieval.progress.ModelSummary` is Lightning's RichModelSummary itself (no copy
    to break on an upgrade); importing progress (the city generator's workers do) does not import Lightning."""
    code = """
import sys
import siamese_retrieval.progress as progress
assert "pytorch_lightning" not in sys.modules, "progress imported Lightning"
from hydra.utils import get_class
from pytorch_lightning.callbacks import RichModelSummary
assert get_class("siamese_retrieval.progress.ModelSummary") is RichModelSummary
assert progress.ModelSummary(max_depth=1)._max_depth == 1
try:
    progress.Missing
except AttributeError as exc:
    print(exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "module 'siamese_retrieval.progress' has no attribute 'Missing'"


# ----------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`python train.py debug=fast logger=none` on a cold cache (every step runs), progress forced on, in a
    pipe with a narrow COLUMNS: the combined stdout + stderr and the log dir."""
    tmp = tmp_path_factory.mktemp("quiet_run")
    env = {**os.environ, "SIAMESE_CACHE_DIR": str(tmp / "cache"), "WANDB_MODE": "offline", "SIAMESE_PROGRESS": "1",
           "COLUMNS": "40"}
    env.pop("WANDB_QUIET", None)
    args = [sys.executable, str(ROOT / "train.py"), "debug=fast", "logger=none", f"paths.log_dir={tmp / 'logs'}"]
    if "model_summary" not in (ROOT / "conf" / "callbacks" / "default.yaml").read_text():
        args.append("+callbacks.model_summary._target_=siamese_retrieval.progress.ModelSummary")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return output, tmp / "logs"


def test_default_run_prints_no_third_party_info(default_run: tuple[str, Path]) -> None:
    output, _ = default_run
    assert "faiss.loader" not in output
    assert "Tip" not in output and "litlogger" not in output and "litmodels" not in output
    assert "anonymous" not in output
    assert "siamese_retrieval.data.keypoints" in output  # our own INFO lines stay
    assert output.count("Trainable params") == 1  # the model summary itself stays, once (rank 0, fit start)


def test_default_run_shows_each_step_and_an_unwrapped_table(default_run: tuple[str, Path]) -> None:
    output, _ = default_run
    lines = output.splitlines()
    for step, total in (("rendering city streets (160 images)", 4), ("extracting ORB keypoints", 160)):
        done = [ln for ln in lines if ln.startswith(step)]
        assert len(done) == 1 and f" {total}/{total} " in done[0], (step, done)  # one finished line per step
    # COLUMNS=40 in a pipe: the table and the checkpoint line keep their full width
    assert any(ln.startswith("│ range_acc@0.01 │") and ln.count("│") == 4 for ln in lines), output[-1500:]
    best = [ln for ln in lines if ln.startswith("best checkpoint: ")]
    assert len(best) == 1 and best[0].endswith(".ckpt") and Path(best[0].split(": ", 1)[1]).is_file()


# ----------------------------------------------------------------------------------------- pictures


def test_chance_line_is_the_expected_recall_of_a_random_ranking(tmp_path: Path) -> None:
    from siamese_retrieval.retrieval.visualize import CURVE_K, plot_recall_curve
    from siamese_retrieval.retrieval.ranking import Ranking

    def curves(sim: np.ndarray) -> dict[str, np.ndarray]:
        m = len(sim)
        ranking = Ranking(np.arange(m), np.tile(np.arange(10), (m, 1)), np.zeros((m, 10), np.float32),
                          np.ones(m, np.int64), {})
        return plot_recall_curve(tmp_path / "recall_at_k.png", ranking, title="known case",
                                 truth=SimpleNamespace(sim=sim, fov=sim.astype(np.float32)))

    # n = 10, p = 1: a random top k holds the positive with probability k / 10
    chance = curves(np.eye(1, 10, dtype=bool))["chance"]
    assert len(chance) == CURVE_K
    np.testing.assert_allclose(chance[:10], np.arange(1, 11) / 10)
    np.testing.assert_allclose(chance[10:], 1.0)
    # two queries (p = 3 and p = 1, n = 10): the mean of 1 - C(n - p, k) / C(n, k)
    sim = np.zeros((2, 10), bool)
    sim[0, :3] = sim[1, 5] = True
    expected = [np.mean([1 - math.comb(10 - p, k) / math.comb(10, k) for p in (3, 1)]) for k in range(1, 11)]
    np.testing.assert_allclose(curves(sim)["chance"][:10], expected)
    img = cv2.imread(str(tmp_path / "recall_at_k.png"))
    assert img is not None and img.shape[:2] == (440, 660)


def test_grid_has_a_best_positive_column_and_the_conditions(tmp_path: Path) -> None:
    from siamese_retrieval.data.conditions import CONFIG_FILE, query_conditions
    from siamese_retrieval.retrieval.ranking import Ranking, ranking_grid
    from siamese_retrieval.retrieval.visualize import BORDER, GAP, HEADER_H, LEGEND_H, LINE_H, SPACE, retrieval_grid

    ds = make_dataset(tmp_path / "city", n_streets=2, per_street=6, height=96, width=128)
    assert query_conditions(ds.root, ds.n_query) is None  # not a synthetic city: the grid does without
    conditions = ["night", "fog", "sunny"] * 4
    (ds.root / CONFIG_FILE).write_text(json.dumps({"conditions": conditions}))
    assert query_conditions(ds.root, ds.n_query) == conditions
    assert query_conditions(ds.root, ds.n_query + 1) is None  # another dataset's config: not trusted

    m, keep, n_q, k = ds.n_query, 10, 4, 5
    order = np.argsort(-(ds.fov + 0.01 * np.arange(ds.n_db)[None, :]), axis=1)[:, :keep]
    ranking = Ranking(np.arange(m), order, np.take_along_axis(ds.fov, order, 1), np.ones(m, np.int64), {})
    grid = ranking_grid(ds, ranking, n_queries=n_q, top_k=k)
    cell_w, cell_h = 160 + 2 * BORDER, 120 + 2 * BORDER + 2 * LINE_H + 4
    width = (k + 2) * cell_w + (k - 1) * SPACE + 2 * GAP  # query | ranking | best positive
    assert grid.shape[1] == width
    rows_h = HEADER_H + n_q * (cell_h + GAP // 2)
    assert grid.shape[0] - rows_h in (LEGEND_H, 2 * LEGEND_H)  # the legend, on one or two lines

    queries = [ds.query_file(i) for i in range(n_q)]
    ranked = [[ds.db_file(int(j)) for j in order[i, :k]] for i in range(n_q)]
    plain = retrieval_grid(queries, ranked, None)  # retrieve.py's call: no labels, no best positive column
    assert plain.shape == (HEADER_H + n_q * (cell_h + GAP // 2), width - cell_w - GAP, 3)


def test_comparison_chart_draws_baselines_as_lines(tmp_path: Path) -> None:
    from siamese_retrieval.compare import _baseline_method, compare

    def job(path: Path, body: dict) -> None:
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({"status": "ok", "data": "synth_tiny", **body}))

    for seed, r1 in enumerate((0.02, 0.0, 0.01)):  # std > mean: the error bar is clipped at 0
        job(tmp_path / "sweep" / str(seed), {"model": "keypoint_snn", "seed": seed,
                                             "overrides": ["model=keypoint_snn", f"seed={seed}"],
                                             "metrics": {"test/recall@1": r1, "test/mAP": 0.1}})
    job(tmp_path / "orb", {"method": "orb_ransac", "seed": 0, "overrides": ["method=orb_ransac"],
                           "metrics": {"test/recall@1": 0.7, "test/mAP": 0.4}})
    result = compare([tmp_path / "sweep", tmp_path / "orb"], out_dir=tmp_path / "out")
    assert sorted(str(_baseline_method(g)) for g in result["groups"]) == ["None", "orb_ransac"]
    img = cv2.imread(str(result["png_path"]))
    assert img is not None and img.shape[0] > 300
