"""evaluate.py and retrieve.py end to end on the tiny city: same numbers as training, outputs, cache, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import shutil

import cv2
import numpy as np
import pytest

from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.errors import ConfigError, UserError
from siamese_retrieval.evaluate import evaluate
from siamese_retrieval.retrieve import retrieve
from siamese_retrieval.train import train
from tests.conftest import ROOT, compose_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    out = tmp_path_factory.mktemp("train_run")
    cfg = compose_config("train", ["data=synth_tiny", "trainer=cpu", "trainer.max_epochs=2", "seed=3", "logger=none"],
                         out, cache_dir)
    result = train(cfg)
    return Path(result["checkpoint"]), result


def _eval(overrides: list[str], out: Path, cache_dir: Path) -> dict:
    return evaluate(compose_config("eval", overrides, out, cache_dir))


def test_evaluate_reproduces_the_training_test_metrics(trained, tmp_path: Path, cache_dir: Path) -> None:
    ckpt, train_result = trained
    result = _eval(["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}"], tmp_path, cache_dir)
    logged = {k: v for k, v in train_result["metrics"].items() if k.startswith("test/")}
    assert {"test/recall@1", "test/precision@10", "test/mAP", "test/ndcg@10", "test/range_acc@0.01"} <= set(logged)
    for name, value in logged.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"]) and saved["split"] == "test"
    assert saved["seconds_per_query"] > 0


@pytest.fixture(scope="module")
def cnn_small_images(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """cnn_snn trained at a non-default image size (the checkpoint must carry it to evaluate.py)."""
    out = tmp_path_factory.mktemp("cnn_run")
    cfg = compose_config("train", ["model=cnn_snn", "data=synth_tiny", "trainer=cpu", "trainer.max_epochs=1",
                                   "+trainer.limit_train_batches=3", "model.inputs.height=48", "model.inputs.width=64",
                                   "seed=2", "logger=none"], out, cache_dir)
    result = train(cfg)
    return Path(result["checkpoint"]), result


def test_a_checkpoint_alone_in_an_empty_folder_reproduces_training(cnn_small_images, tmp_path: Path,
                                                                   cache_dir: Path) -> None:
    """The README command on a copied checkpoint: no run dir, no .hydra/config.yaml, no model=: same test metrics."""
    ckpt, train_result = cnn_small_images
    alone = tmp_path / "empty" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(ckpt, alone)
    env = {**os.environ, "WANDB_MODE": "offline", "SIAMESE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={alone}", "data=synth_tiny", "seed=2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    logged = {k: v for k, v in train_result["metrics"].items() if k.startswith("test/")}
    assert {"test/recall@1", "test/mAP", "test/ndcg@10", "test/range_acc@0.01", "test/loss"} <= set(logged)
    for name, value in logged.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert result["model"] == "cnn_snn" and result["checkpoint"] == str(alone)
    assert sorted(p.name for p in alone.parent.iterdir()) == ["model.ckpt"]  # nothing written beside it


def _per_query(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {r[0]: r[3:] for r in rows}


def _tiny_city(cache_dir: Path) -> Path:
    """The tiny city's root (the cache may hold other cities too: training-only cities of other tests)."""
    from siamese_retrieval.data.synth import SynthConfig, ensure_city

    return Path(ensure_city(cache_dir, SynthConfig.from_preset("tiny")))


def _orb_features(cache_dir: Path, paths: list[str]):
    from siamese_retrieval.retrieval.orb_features import extract_features
    from siamese_retrieval.retrieval.orb_ransac import OrbRansacConfig

    root = _tiny_city(cache_dir)
    cfg = OrbRansacConfig(**{k: v for k, v in compose_config("eval", [], cache_dir / "x", cache_dir).orb_ransac.items()
                             if k != "workers"})
    return extract_features([root / p for p in paths], cfg, workers=1), cfg


def test_orb_ransac_ranks_by_most_inliers(tmp_path: Path, cache_dir: Path) -> None:
    """Known answer: the baseline's top 10 is the database sorted by inlier count (ties: lower index)."""
    from siamese_retrieval.data.dataset import read_dataset
    from siamese_retrieval.retrieval.orb_ransac import inlier_count

    _eval(["data=synth_tiny", "seed=3", "method=orb_ransac"], tmp_path, cache_dir)
    ranked = _per_query(tmp_path / "per_query.csv")
    ds = read_dataset(_tiny_city(cache_dir), check="none")
    queries = sorted(ranked)
    feats, cfg = _orb_features(cache_dir, queries + ds.db_paths)
    ordered = 0
    for qi, q in enumerate(queries):
        inliers = np.array([inlier_count(feats[qi], feats[len(queries) + j], cfg) for j in range(ds.n_db)])
        expected = [ds.db_paths[j] for j in np.argsort(-inliers, kind="stable")[:10]]
        assert ranked[q] == expected, q
        ordered += inliers.max() > inliers.min()
    assert ordered >= len(queries) // 2  # real orderings, not only ties at zero inliers


def test_rerank_puts_the_most_inliers_of_the_top_n_first(trained, tmp_path: Path, cache_dir: Path) -> None:
    """Known answer: re-ranked top N = the model's top N sorted by inliers (ties: the model's order)."""
    from siamese_retrieval.retrieval.orb_ransac import inlier_count

    ckpt, _ = trained
    base = ["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}"]
    _eval(base, tmp_path / "model", cache_dir)
    _eval(base + ["rerank=orb_ransac", "rerank.top_n=5"], tmp_path / "rerank", cache_dir)
    model, fused = _per_query(tmp_path / "model" / "per_query.csv"), _per_query(tmp_path / "rerank" / "per_query.csv")
    assert model.keys() == fused.keys()
    queries = sorted(model)
    feats, cfg = _orb_features(cache_dir, queries + sorted({p for q in queries for p in model[q][:5]}))
    index = {p: i for i, p in enumerate(queries + sorted({p for q in queries for p in model[q][:5]}))}
    changed = 0
    for q in queries:
        top = model[q][:5]
        inliers = [inlier_count(feats[index[q]], feats[index[p]], cfg) for p in top]
        expected = [top[i] for i in sorted(range(5), key=lambda i: (-inliers[i], i))]
        assert fused[q][:5] == expected, q
        assert fused[q][5:] == model[q][5:], q  # below the top N the model's order stays
        changed += expected != top
    assert changed > 0  # the re-ranker really reordered something


def test_split_all_on_an_unseen_city_writes_every_output(trained, tmp_path: Path, cache_dir: Path) -> None:
    ckpt, _ = trained
    # render the second city in this process: the generator's fork pool can hang once torch's OpenMP
    # threads have run here (the training fixture)
    ensure_city(cache_dir, SynthConfig.from_preset("tiny", seed=1), workers=1)
    result = _eval(["data=synth_tiny", "data.synth.seed=1", "split=all", f"ckpt_path={ckpt}"], tmp_path, cache_dir)
    assert result["split"] == "all" and result["n_queries"] == 40  # the tiny city's every query
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for name in ("recall@1", "recall@5", "recall@10", "precision@10", "mAP", "ndcg@10", "range_acc@0.01"):
        assert 0.0 <= metrics[f"all/{name}"] <= 1.0
    assert not any(k.startswith("test/") for k in metrics)
    with open(tmp_path / "per_query.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query", "first_positive_rank", "precision@10", *(f"top_{j}" for j in range(1, 11))]
    assert len(rows) - 1 == result["n_queries"]
    recall1 = sum(int(r[1]) == 1 for r in rows[1:]) / sum(int(r[1]) > 0 for r in rows[1:])
    assert recall1 == pytest.approx(metrics["all/recall@1"], abs=1e-6)
    assert all(r[0].startswith("query/") and r[3].startswith("database/") for r in rows[1:])
    for png in ("recall_at_k.png", "retrieval_grid.png"):
        img = cv2.imread(str(tmp_path / png))
        assert img is not None and img.shape[0] > 50 and img.shape[1] > 50, png


def test_orb_ransac_baseline_and_rerank(trained, tmp_path: Path, cache_dir: Path) -> None:
    ckpt, _ = trained
    base = _eval(["data=synth_tiny", "seed=3", "method=orb_ransac"], tmp_path / "orb", cache_dir)
    assert base["checkpoint"] is None and base["seconds_per_query"] > 0
    assert base["n_queries"] == 10 and (tmp_path / "orb" / "per_query.csv").is_file()
    rr = _eval(["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}", "rerank=orb_ransac", "rerank.top_n=10"],
               tmp_path / "rerank", cache_dir)
    m = rr["metrics"]
    assert rr["method"] == "model+rerank_orb_ransac"
    # re-ranking permutes the top 10 only: which images are in it (precision@10, recall@10) cannot change
    assert m["test/precision@10"] == pytest.approx(m["test/before_rerank/precision@10"], abs=1e-6)
    assert m["test/recall@10"] == pytest.approx(m["test/before_rerank/recall@10"], abs=1e-6)


def test_retrieve_prints_top_k_writes_the_grid_and_reuses_the_cache(trained, tmp_path: Path, cache_dir: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    ckpt, _ = trained
    before_retrieve = [p.name for p in Path(ckpt).parent.iterdir()]
    query = next((cache_dir).glob("synth-*/query/images/*.jpg"))
    log_dir = tmp_path / "outputs"
    args = ["data=synth_tiny", f"ckpt_path={ckpt}", f"query={query}", f"paths.log_dir={log_dir}", "top_k=5"]
    first = retrieve(compose_config("retrieve", args, log_dir / "retrieve", cache_dir))
    printed = capsys.readouterr().out
    assert not first["cache_hit"] and len(first["queries"][0]["results"]) == 5
    assert "cache miss" in printed and first["queries"][0]["results"][0]["path"] in printed
    grid = log_dir / "retrieve" / f"retrieval_grid-{query.stem}.png"  # grid.dir: ${paths.log_dir}/retrieve
    assert first["grid"] == str(grid) and grid.stat().st_size > 1000
    # the index cache is in the cache dir (${paths.cache_dir}/index/<key>/), nothing beside the checkpoint
    assert Path(first["cache_dir"]).parent == cache_dir / "index"
    assert (Path(first["cache_dir"]) / "index.faiss").is_file()
    assert sorted(p.name for p in Path(ckpt).parent.iterdir()) == sorted(before_retrieve)

    # the command line: a cache hit, stdout is pure JSON, and no run folder, .hydra/ or log file per call
    proc = subprocess.run([sys.executable, str(ROOT / "retrieve.py"), *args[:-1], "top_k=1000", "output=json",
                           "grid.dir=null"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "SIAMESE_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout)
    assert shown["cache_hit"] and shown["cache_dir"] == first["cache_dir"] and shown["grid"] is None
    assert sorted(p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*")) == ["retrieve", f"retrieve/{grid.name}"]
    assert shown["top_k"] == shown["n_database"] == 120  # capped at the database size
    ranked = [r["path"] for r in shown["queries"][0]["results"]]
    assert ranked[:5] == [r["path"] for r in first["queries"][0]["results"]]
    scores = [r["score"] for r in shown["queries"][0]["results"]]
    assert scores == sorted(scores, reverse=True)


def test_missing_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={missing}", "data=synth_tiny",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1] == f"error: checkpoint {missing} not found"
    assert "Traceback" not in proc.stderr


def test_checkpoint_of_another_model_type_is_a_clear_error(trained, tmp_path: Path, cache_dir: Path) -> None:
    ckpt, _ = trained  # a keypoint_snn checkpoint
    with pytest.raises(UserError, match=rf"checkpoint {ckpt} holds model_name='keypoint_snn', expected 'cnn_snn'"):
        _eval(["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}", "model=cnn_snn"], tmp_path, cache_dir)


def test_retrieve_reranks_in_the_same_order_as_evaluate(trained, tmp_path: Path, cache_dir: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`retrieve.py rerank=orb_ransac` and `evaluate.py rerank=orb_ransac` build one re-ranker
    (retrieval/rerankers.py): every query of the city gets the same top 10 from both."""
    ckpt, _ = trained
    rerank = ["rerank=orb_ransac", "rerank.top_n=8"]
    ev = _eval(["data=synth_tiny", "seed=3", f"ckpt_path={ckpt}", "split=all", *rerank, "logger=none"],
               tmp_path / "eval", cache_dir)
    assert ev["method"] == "model+rerank_orb_ransac"
    with open(tmp_path / "eval" / "per_query.csv") as f:
        rows = list(csv.DictReader(f))
    evaluated = {row["query"]: [row[f"top_{j}"] for j in range(1, 11)] for row in rows}
    root = Path(ev["dataset_root"])
    log_dir = tmp_path / "outputs"
    args = ["data=synth_tiny", f"ckpt_path={ckpt}", f"query={root / 'query' / 'images'}", f"paths.log_dir={log_dir}",
            "top_k=10", "grid.dir=null", *rerank]
    got = retrieve(compose_config("retrieve", args, log_dir / "retrieve", cache_dir))
    assert got["rerank"] == "orb_ransac" and len(got["queries"]) == len(evaluated)
    changed = 0
    for item in got["queries"]:
        query = Path(item["query"]).relative_to(root.resolve()).as_posix()
        order = [r["path"] for r in item["results"]]
        assert order == evaluated[query], query
        # the re-ranker's scores (1 + inliers + relevance / 2 in the top 8) rank the top 8 first
        assert [r["rerank_score"] for r in item["results"][:8]] == sorted(r["rerank_score"] for r in item["results"][:8])[::-1]
        plain_order = sorted(item["results"], key=lambda r: -r["score"])
        changed += order[:8] != [r["path"] for r in plain_order[:8]]
    assert changed > 0  # verification did re-order some queries (else the check above proves nothing)

    from siamese_retrieval.retrieve import print_results

    print_results({**got, "queries": got["queries"][:1]}, "table")  # the console shows the score it is ordered by
    lines = capsys.readouterr().out.splitlines()
    assert any("relevance" in ln and "orb_ransac score" in ln for ln in lines), lines
    first = got["queries"][0]["results"][0]
    row = next(ln for ln in lines if f" {first['path']} " in ln)
    assert f"{first['score']:.4f}" in row and f"{first['rerank_score']:.4f}" in row, row

    import siamese_retrieval.retrieve as retrieve_module

    drawn = {}
    monkeypatch.setattr(retrieve_module, "retrieval_grid", lambda q, d, labels, scores: drawn.update(scores=scores))
    monkeypatch.setattr(retrieve_module, "save_png", lambda path, grid: path)
    retrieve_module.write_grid(tmp_path / "grid.png", got["queries"][:2])  # the tiles are labelled as ordered
    assert drawn["scores"] == [[r["rerank_score"] for r in item["results"]] for item in got["queries"][:2]]


def test_benchmarks_in_one_run_equal_each_benchmark_alone(tiny_checkpoint: Path, tmp_path: Path,
                                                          cache_dir: Path) -> None:
    """`benchmarks=[vpr_folder:A,msls_city:B]`: one model load, a row per benchmark in benchmarks.csv / .md whose
    numbers are exactly those of `data=NAME data.root=ROOT split=all` evaluated alone."""

    from siamese_retrieval.data.synth.export import export_vpr_folder

    city = ensure_city(cache_dir, SynthConfig.from_preset("tiny"))
    vpr = export_vpr_folder(city, tmp_path / "vpr")
    both = evaluate(compose_config("eval", [f"ckpt_path={tiny_checkpoint}", "logger=none",
                                            f"benchmarks=[vpr_folder:{vpr},msls_city:{city}]"], tmp_path / "b", cache_dir))
    with open(tmp_path / "b" / "benchmarks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["benchmark"] for r in rows] == ["vpr_folder", "msls_city"] and rows[0]["radius_m"] == "25.0" and rows[1]["radius_m"] == ""
    assert (tmp_path / "b" / "benchmarks.md").read_text().count("\n") == 4  # header, rule, two rows
    assert all("torch=" in r["versions"] and "numpy=" in r["versions"] for r in rows)  # what produced them
    assert [r["benchmark"] for r in both["benchmarks"]] == ["vpr_folder", "msls_city"]
    for i, (name, root) in enumerate((("vpr_folder", vpr), ("msls_city", city))):
        alone = evaluate(compose_config("eval", [f"ckpt_path={tiny_checkpoint}", "logger=none", f"data={name}",
                                                 f"data.root={root}", "split=all"], tmp_path / f"a{i}", cache_dir))
        for k in ("recall@1", "recall@5", "recall@10", "mAP"):
            assert float(rows[i][k]) == alone["metrics"][f"all/{k}"], (name, k)
        assert int(rows[i]["queries"]) == alone["n_queries"] and int(rows[i]["database"]) == alone["n_database"]
        assert (tmp_path / "b" / "benchmarks" / f"{i}_{name}" / "per_query.csv").is_file()
    with pytest.raises(ConfigError, match="benchmarks: 'vpr_folder' must be NAME:ROOT"):
        evaluate(compose_config("eval", [f"ckpt_path={tiny_checkpoint}", "logger=none", "benchmarks=[vpr_folder]"],
                                tmp_path / "c", cache_dir))
    with pytest.raises(ConfigError) as info:  # a mistyped NAME: the data configs it could be
        evaluate(compose_config("eval", [f"ckpt_path={tiny_checkpoint}", "logger=none",
                                         f"benchmarks=[vpr_foldr:{vpr}]"], tmp_path / "d", cache_dir))
    assert str(info.value).startswith(f"benchmarks: vpr_foldr:{vpr}: In 'eval': Could not find 'data/vpr_foldr'")
    assert str(info.value).endswith("; NAME is one of gsv_cities, msls_city, msls_official, synth, synth_large, "
                                    "synth_tiny, synth_views, vpr_folder")


def test_a_benchmark_monitors_training(tmp_path: Path, cache_dir: Path) -> None:
    """benchmark_monitor=NAME: validation ranks that benchmark too, the checkpoint keeps the epoch with the best
    val/NAME/recall@1, and the numbers logged for the best checkpoint are evaluate.py's on that benchmark alone."""
    city = ensure_city(cache_dir, SynthConfig.from_preset("tiny"))
    common = ["model=keypoint_snn", "data=synth_tiny", "trainer.max_epochs=2", "logger=none",
              f"benchmarks=[msls_city:{city}]"]
    cfg = compose_config("train", [*common, "benchmark_monitor=msls_city"], tmp_path / "t", cache_dir)
    result = train(cfg)
    assert cfg.callbacks.model_checkpoint.monitor == "val/msls_city/recall@1"
    alone = evaluate(compose_config("eval", [f"ckpt_path={result['checkpoint']}", "data=msls_city",
                                             f"data.root={city}", "split=all", "logger=none"], tmp_path / "e",
                                    cache_dir))["metrics"]
    for k in ("recall@1", "recall@5", "recall@10", "mAP"):
        assert result["metrics"][f"val/msls_city/{k}"] == alone[f"all/{k}"], k
    with pytest.raises(ConfigError, match=r"benchmark_monitor=pitts: not one of benchmarks \(msls_city\)"):
        train(compose_config("train", [*common, "benchmark_monitor=pitts"], tmp_path / "b", cache_dir))
