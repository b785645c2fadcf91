"""examples/: extending the framework from outside the package, run as each README types it.

Each example folder is copied out of the repository (so nothing but the installed package and the folder itself
is on hand) and its README's commands are run there as typed, in order, with a bash shell.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"


def readme_commands(readme: Path) -> list[str]:
    """The commands of the README's ```bash blocks, in order (comment lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def run_in(folder: Path, command: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("PROJECT_ROOT", "PYTHONPATH", "HYDRA_FULL_ERROR"):  # as a user's shell: no test settings
        env.pop(key, None)
    return subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def trained_checkpoint(folder: Path, command: str, run_dir: str, cache_dir: Path) -> dict:
    """Run an example's training command in its folder; its last checkpoint, loaded as data."""
    proc = run_in(folder, command, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(folder / "outputs" / run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow  # like the other examples: a training run and three evaluations as subprocesses (25 s)
def test_custom_encoder_trains_and_its_checkpoint_needs_trust(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "custom_encoder"
    shutil.copytree(EXAMPLES / "custom_encoder", folder)
    train, refused, allowed = readme_commands(folder / "README.md")

    raw = trained_checkpoint(folder, train, "tiny_custom", cache_dir)
    assert raw["hyper_parameters"]["encoder"]["_target_"] == "tiny_encoder.TinyEncoder"
    assert any(k.startswith("encoder.net.") for k in raw["state_dict"])  # the user's module was trained

    proc = run_in(folder, refused, cache_dir)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines == ["error: checkpoint outputs/tiny_custom/checkpoints/last.ckpt: refusing to instantiate "
                     "encoder._target_='tiny_encoder.TinyEncoder': it is not a registered component of this "
                     "package; if you trust that class, add trust.allow=[tiny_encoder.TinyEncoder]"]

    proc = run_in(folder, allowed, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (folder / "outputs" / "tiny_custom_eval" / "metrics.json").read_text()
    assert '"model": "tiny_custom"' in metrics and '"test/recall@1"' in metrics


@pytest.mark.slow  # ~55 s: its reader is tested in-process (tests/test_gsv_cities.py, test_layouts.py)
def test_custom_layout_is_read_evaluated_and_trained_on(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "custom_layout"
    shutil.copytree(EXAMPLES / "custom_layout", folder)
    make, evaluate, train, unregistered = readme_commands(folder / "README.md")

    proc = run_in(folder, make, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = folder / "csv_city"
    assert sorted(p.name for p in root.iterdir()) == ["database.csv", "images", "queries.csv"]  # the CSV layout only
    places = {}
    for kind in ("database", "queries"):
        with open(root / f"{kind}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and list(rows[0]) == ["path", "east", "north", "heading"]
        assert all((root / r["path"]).is_file() for r in rows)
        places[kind] = ([r["path"] for r in rows], np.array([[float(r[c]) for c in ("east", "north", "heading")]
                                                             for r in rows]))

    proc = run_in(folder, evaluate, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = folder / "outputs" / "csv_eval"
    result = json.loads((out / "metrics.json").read_text())
    assert (result["method"], result["data"], result["split"]) == ("orb_ransac", "csv_city", "all")
    assert result["dataset_root"] == str(root.resolve())
    assert (result["n_database"], result["n_queries"]) == (len(places["database"][0]), len(places["queries"][0]))
    assert result["metrics"]["all/n_queries_without_positive"] == 0
    assert result["metrics"]["all/recall@1"] > 0.3  # ORB + RANSAC finds the places the reader's positives name
    # the positives are the reader's rule on the CSV columns (conf/data/csv_city.yaml: 10 m, 45 degrees)
    db_paths, db_loc = places["database"]
    q_paths, q_loc = places["queries"]
    near = ((q_loc[:, None, :2] - db_loc[None, :, :2]) ** 2).sum(-1) <= 10.0**2
    turn = np.abs((q_loc[:, None, 2] - db_loc[None, :, 2] + 180.0) % 360.0 - 180.0)
    positive = near & (turn <= 45.0)
    with open(out / "per_query.csv", newline="") as f:
        per_query = list(csv.DictReader(f))
    assert [r["query"] for r in per_query] == q_paths
    for q, row in enumerate(per_query):
        top = [positive[q, db_paths.index(row[f"top_{k}"])] for k in range(1, 11)]
        assert float(row["precision@10"]) == pytest.approx(sum(top) / 10)
        first = int(row["first_positive_rank"])
        assert (first == top.index(True) + 1) if any(top) else (first > 10)

    proc = run_in(folder, train, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((folder / "outputs" / "csv_train" / "metrics.json").read_text())
    assert (trained["status"], trained["data"], trained["model"]) == ("ok", "csv_city", "keypoint_snn")
    splits = trained["splits"]  # split by place: one 1000 m cell per street of the tiny city
    assert (splits["n_train_places"], splits["n_val_places"], splits["n_test_places"]) == (2, 1, 1)
    assert splits["n_db"] == len(db_paths) and "test/recall@1" in trained["metrics"]
    assert (folder / "outputs" / "csv_train" / "checkpoints" / "last.ckpt").is_file()

    proc = run_in(folder, unregistered, cache_dir)  # without imports=[csv_layout]: one line, exit code 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: data.layout='csv_places': must be one of contract, ")
    assert lines[0].endswith("; a component registered by your own module loads with imports=[your_module]")


def _hue_saturation(path: Path) -> np.ndarray:
    hsv = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 16], [0, 180, 0, 256]).ravel().astype(np.float64)
    return hist / hist.sum()


@pytest.mark.slow  # the re-ranker registry in both pipelines: test_evaluate's retrieve-vs-evaluate test (default)
def test_custom_reranker_reorders_in_evaluate_and_retrieve(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "custom_reranker"
    shutil.copytree(EXAMPLES / "custom_reranker", folder)
    train, evaluate, photos, retrieve = readme_commands(folder / "README.md")

    for command in (train, evaluate):
        proc = run_in(folder, command, cache_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((folder / "outputs" / "colour_eval" / "metrics.json").read_text())
    assert result["method"] == "model+rerank_colour_hist" and result["model"] == "keypoint_snn"
    metrics = result["metrics"]
    before = {k.replace("before_rerank/", ""): v for k, v in metrics.items() if k.startswith("test/before_rerank/")}
    assert {"test/recall@1", "test/mAP", "test/ndcg@10"} <= set(before) <= set(metrics)
    assert any(metrics[k] != v for k, v in before.items())  # the re-ranker changed the ranking

    proc = run_in(folder, photos, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_in(folder, retrieve, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["rerank"] == "colour_hist" and out["top_k"] == 5
    assert len(out["queries"]) == len(list((folder / "photos" / "query" / "images").glob("*.jpg")))
    reordered = 0
    for query in out["queries"]:
        results = query["results"]
        assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
        mixed = [r["rerank_score"] for r in results]
        assert mixed == sorted(mixed, reverse=True)  # in the re-ranker's order
        q_hist = _hue_saturation(Path(query["query"]))
        for r in results:  # 1 + (1 - weight) * relevance + weight * intersection, weight 0.5 (conf/rerank)
            colour = np.minimum(q_hist, _hue_saturation(Path(r["file"]))).sum()
            assert r["rerank_score"] == pytest.approx(1 + 0.5 * r["score"] + 0.5 * colour, abs=1e-5)
        model = [r["score"] for r in results]
        reordered += model != sorted(model, reverse=True)
    assert reordered > 0  # not the model's order everywhere


@pytest.mark.slow  # ~40 s; the registry path of a head is tested in-process (tests/test_aggregation_heads.py)
def test_custom_head_trains_and_its_checkpoint_needs_the_import(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "custom_head"
    shutil.copytree(EXAMPLES / "custom_head", folder)
    train, without_import, evaluate = readme_commands(folder / "README.md")

    raw = trained_checkpoint(folder, train, "mac", cache_dir)
    assert raw["hyper_parameters"]["encoder"]["aggregation"]["name"] == "mac"
    # MAC keeps the trunk's channels: the projection takes PlainCNN's last width
    assert raw["state_dict"]["encoder.proj.weight"].shape[1] == raw["hyper_parameters"]["encoder"]["widths"][-1]

    proc = run_in(folder, without_import, cache_dir)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "aggregation.name='mac': must be one of" in lines[0] and "imports=[your_module]" in lines[0], lines[0]

    proc = run_in(folder, evaluate, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((folder / "outputs" / "mac_eval" / "metrics.json").read_text())
    assert result["model"] == "cnn_snn" and 0 <= result["metrics"]["test/recall@1"] <= 1
