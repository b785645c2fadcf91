"""Retrieval metrics against a hand-computed example and against torchmetrics' functional ops."""

from __future__ import annotations

import math
import time

import pytest
import pytorch_lightning as pl
import torch
from torchmetrics.functional.retrieval import (
    retrieval_average_precision,
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_precision,
)

from siamese_retrieval.models.pair_metrics import RangeAccuracy, range_accuracy
from siamese_retrieval.retrieval.metrics import (
    RetrievalScores,
    per_query_retrieval_scores,
    prefixed,
)

L3 = math.log2(3)  # discount of rank 2 is 1/log2(2+1) = 1/1.5849625; rank 1: 1/log2(2) = 1; rank 3: 1/log2(4) = 1/2

# 3 queries x 6 database items.
SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # q0: ranking = items 0,1,2,3,4,5
        [0.1, 0.7, 0.7, 0.3, 0.9, 0.2],  # q1: ranking = 4, 1, 2 (tie with 1: lower index first), 3, 5, 0
        [0.3, 0.2, 0.1, 0.6, 0.5, 0.4],  # q2: no positive at all
    ]
)
SIM = torch.tensor(
    [
        [0, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)
FOV = torch.tensor(
    [
        [0.2, 0.9, 0.0, 0.6, 0.3, 0.0],
        [0.5, 0.4, 1.0, 0.1, 0.8, 0.0],
        [0.3, 0.0, 0.1, 0.0, 0.0, 0.2],
    ]
)

# q0: relevance in ranked order [0, 1, 0, 1, 0, 0]  (2 positives, at ranks 2 and 4)
#   precision@1 = 0/1 = 0            precision@5 = 2/5 = 0.4
#   recall@1    = 0                  recall@5    = 1
#   AP = (1/2 + 2/4) / 2 = 0.5
#   fov in ranked order [0.2, 0.9, 0.0, ...]:  DCG@3 = 0.2/1 + 0.9/1.5849625 + 0.0/2 = 0.2 + 0.5678377 = 0.7678377
#   ideal: 3 largest fov of the row [0.9, 0.6, 0.3]: IDCG@3 = 0.9 + 0.6/1.5849625 + 0.3/2 = 0.9 + 0.3785585 + 0.15 = 1.4285585
#   nDCG@3 = 0.7678377 / 1.4285585 = 0.5374911
Q0_NDCG = (0.2 + 0.9 / L3) / (0.9 + 0.6 / L3 + 0.3 / 2)
# q1: ranking 4, 1, 2, 3, 5, 0 -> relevance [1, 0, 1, 0, 0, 1]  (3 positives, at ranks 1, 3 and 6)
#   precision@1 = 1/1 = 1            precision@5 = 2/5 = 0.4
#   recall@1    = 1                  recall@5    = 1
#   AP = (1/1 + 2/3 + 3/6) / 3 = (1 + 0.6666667 + 0.5) / 3 = 0.7222222
#   fov in ranked order [0.8, 0.4, 1.0, 0.1, 0.0, 0.5]: DCG@3 = 0.8 + 0.4/1.5849625 + 1.0/2 = 0.8 + 0.2523719 + 0.5 = 1.5523719
#   ideal [1.0, 0.8, 0.5]: IDCG@3 = 1.0 + 0.8/1.5849625 + 0.5/2 = 1.0 + 0.5047438 + 0.25 = 1.7547438
#   nDCG@3 = 1.5523719 / 1.7547438 = 0.8846721
#   (were the tie broken the other way, the ranking would start 4, 2, 1 and AP = (1 + 2/2 + 3/6)/3 = 0.8333)
Q1_NDCG = (0.8 + 0.4 / L3 + 1.0 / 2) / (1.0 + 0.8 / L3 + 0.5 / 2)
# q2: no positive -> counted in n_queries_without_positive, left out of every average.
# Means over q0 and q1:
EXPECTED = {
    "precision@1": (0.0 + 1.0) / 2,  # 0.5
    "precision@5": (0.4 + 0.4) / 2,  # 0.4
    "recall@1": (0.0 + 1.0) / 2,  # 0.5
    "recall@5": (1.0 + 1.0) / 2,  # 1.0
    "mAP": (0.5 + (1 + 2 / 3 + 3 / 6) / 3) / 2,  # (0.5 + 0.7222222) / 2 = 0.6111111
    "ndcg@3": (Q0_NDCG + Q1_NDCG) / 2,  # (0.5374911 + 0.8846721) / 2 = 0.7110816
    "n_queries": 3.0,
    "n_queries_without_positive": 1.0,
}


def test_hand_computed_example():
    assert Q0_NDCG == pytest.approx(0.5374911, abs=1e-6) and Q1_NDCG == pytest.approx(0.8846721, abs=1e-6)
    metric = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    metric.update(SCORES, SIM, FOV)
    result = metric.compute()
    assert set(result) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert result[name].item() == pytest.approx(value, abs=1e-6), name


def test_per_query_values_and_no_positive_mask():
    per_q = per_query_retrieval_scores(SCORES, SIM, FOV, top_ks=(1, 5), ndcg_k=3)
    assert per_q["has_positive"].tolist() == [True, True, False]
    assert per_q["AP"][:2].tolist() == pytest.approx([0.5, 0.7222222], abs=1e-6)
    assert per_q["ndcg@3"][:2].tolist() == pytest.approx([Q0_NDCG, Q1_NDCG], abs=1e-6)


def test_two_chunks_equal_one_and_merge_states():
    one = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    one.update(SCORES, SIM, FOV)
    chunked = RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    chunked.update(SCORES[:1], SIM[:1], FOV[:1])
    chunked.update(SCORES[1:], SIM[1:], FOV[1:])
    # what DDP does: each rank holds some queries, the sum states are added
    rank0, rank1 = RetrievalScores(top_ks=(1, 5), ndcg_k=3), RetrievalScores(top_ks=(1, 5), ndcg_k=3)
    rank0.update(SCORES[[2, 0]], SIM[[2, 0]], FOV[[2, 0]])
    rank1.update(SCORES[1:2], SIM[1:2], FOV[1:2])
    rank0.merge_state(rank1)
    expected = one.compute()
    for other in (chunked.compute(), rank0.compute()):
        for name, value in expected.items():
            assert other[name].item() == pytest.approx(value.item(), abs=1e-7), name


def test_only_queries_without_positive_give_nan_means():
    metric = RetrievalScores()
    metric.update(SCORES[2:], SIM[2:], FOV[2:])
    result = metric.compute()
    assert math.isnan(result["precision@1"].item()) and math.isnan(result["mAP"].item())
    assert result["n_queries"].item() == 1 and result["n_queries_without_positive"].item() == 1


def test_negative_scores_rank_like_positive_ones():
    # negated distances are all <= 0; torchmetrics' functional precision/AP would count nothing relevant
    a = per_query_retrieval_scores(SCORES, SIM, FOV, ndcg_k=3)
    b = per_query_retrieval_scores(SCORES - 10.0, SIM, FOV, ndcg_k=3)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_equals_torchmetrics_functional_on_random_data():
    g = torch.Generator().manual_seed(0)
    n_q, n_db, top_ks, ndcg_k = 60, 200, (1, 5, 10), 10
    scores = torch.rand(n_q, n_db, generator=g) + 0.01  # positive: torchmetrics ignores items with score <= 0
    fov = torch.rand(n_q, n_db, generator=g) * (torch.rand(n_q, n_db, generator=g) < 0.1)
    sim = fov >= 0.5
    sim[:3] = False  # a few queries without positive
    metric = RetrievalScores(top_ks=top_ks, ndcg_k=ndcg_k)
    for start in range(0, n_q, 25):  # uneven chunks
        metric.update(scores[start : start + 25], sim[start : start + 25], fov[start : start + 25])
    result = metric.compute()

    ref: dict[str, list[float]] = {}
    for i in range(n_q):
        if not sim[i].any():
            continue
        for k in top_ks:
            ref.setdefault(f"precision@{k}", []).append(retrieval_precision(scores[i], sim[i], top_k=k).item())
            ref.setdefault(f"recall@{k}", []).append(retrieval_hit_rate(scores[i], sim[i], top_k=k).item())
        ref.setdefault("mAP", []).append(retrieval_average_precision(scores[i], sim[i]).item())
        ref.setdefault(f"ndcg@{ndcg_k}", []).append(retrieval_normalized_dcg(scores[i], fov[i], top_k=ndcg_k).item())
    assert result["n_queries"].item() == n_q and result["n_queries_without_positive"].item() == 3
    for name, values in ref.items():
        assert result[name].item() == pytest.approx(sum(values) / len(values), abs=1e-6), name


def test_update_speed_500_queries_x_1000_database():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(500, 1000, generator=g)
    fov = torch.rand(500, 1000, generator=g) * (torch.rand(500, 1000, generator=g) < 0.05)
    metric = RetrievalScores()
    metric.update(scores[:10], fov[:10] >= 0.5, fov[:10])  # warm-up
    t0 = time.perf_counter()
    metric.update(scores, fov >= 0.5, fov)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"RetrievalScores.update took {elapsed:.3f} s for 500 x 1000"  # measured ~0.013 s


def test_prefixed_names():
    metric = RetrievalScores()
    metric.update(SCORES, SIM, FOV)
    names = set(prefixed(metric.compute(), "val"))
    assert {"val/precision@10", "val/recall@1", "val/mAP", "val/ndcg@10", "val/n_queries",
            "val/n_queries_without_positive"} <= names


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        RetrievalScores().update(SCORES, SIM[:, :5], FOV)


def test_range_accuracy_hand_example_and_boundary():
    # margin 0.25 and dyadic values so that |d| == margin is exact in floating point
    pred = torch.tensor([0.50, 0.50, 0.50, 0.50, 0.125])
    target = torch.tensor([0.50, 0.625, 0.75, 0.25, 1.0])
    # |d| = 0 (in), 0.125 (in), 0.25 (== margin: NOT in), 0.25 (NOT in), 0.875 (out)  -> 2 / 5 = 0.4
    assert range_accuracy(pred, target, margin=0.25).item() == pytest.approx(0.4, abs=1e-6)
    # default margin 0.01: |d| = 0.005 (in), 0.02 (out), 0 (in), 0.5 (out) -> 2 / 4 = 0.5
    assert range_accuracy(torch.tensor([0.505, 0.52, 0.3, 1.0]), torch.tensor([0.5, 0.5, 0.3, 0.5])).item() == 0.5

    metric = RangeAccuracy(margin=0.25)
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    assert metric.compute().item() == pytest.approx(0.4, abs=1e-6)


# ------------------------------------------------------------------------------------------- the METRICS registry
# What "best" means per family (the W&B summaries before the registry: max for the ranking metrics and range_acc,
# min for the loss; counts and the loss terms have none).
DIRECTIONS = {"precision": "max", "recall": "max", "mAP": "max", "ndcg": "max", "range_acc": "max", "loss": "min"}
NO_FAMILY = ("n_queries", "n_queries_without_positive")  # counts; and train/loss_<term>
TABLE_ROWS = ["precision@1", "precision@5", "precision@10", "recall@1", "recall@5", "recall@10", "mAP", "ndcg@10",
              "range_acc@0.01"]  # the results table's rows before the registry (run_outputs.SHOWN_METRICS)


def prefix_rule_best_mode(name: str) -> str | None:
    """The direction rule before the registry (metric-name prefixes), the reference for today's names."""
    metric = name.split("/", 1)[-1]
    if metric.startswith(("recall", "precision", "mAP", "ndcg", "range_acc")):
        return "max"
    return "min" if metric == "loss" else None


class LoggedNames(pl.Callback):
    """Every metric name a run puts in `trainer.callback_metrics`, and the val names BestValSummary defines."""

    seen: set[str] = set()
    summarised: dict[str, str] = {}

    def _collect(self, trainer: pl.Trainer, *_: object) -> None:
        LoggedNames.seen |= set(trainer.callback_metrics)

    on_train_epoch_end = on_validation_end = on_test_end = _collect

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from siamese_retrieval.callbacks import BestValSummary
        from siamese_retrieval.registry import METRICS
        best_mode = METRICS.best_mode

        summary = next(c for c in trainer.callbacks if isinstance(c, BestValSummary))
        LoggedNames.summarised = {n: m for n in summary._val_names(trainer, pl_module) if (m := best_mode(n))}


@pytest.fixture(scope="module")
def tiny_run_names(tmp_path_factory: pytest.TempPathFactory, cache_dir):
    """(every logged name, BestValSummary's val names -> mode, the run's metrics.json metrics) of a tiny run."""
    from omegaconf import open_dict

    from siamese_retrieval.train import train
    from tests.conftest import compose_config

    out = tmp_path_factory.mktemp("metric_names")
    cfg = compose_config("train", ["data=synth_tiny", "trainer=cpu", "trainer.max_epochs=1",
                                   "+trainer.limit_train_batches=2", "logger=none"], out, cache_dir)
    with open_dict(cfg):
        cfg.callbacks.logged_names = {"_target_": f"{__name__}.LoggedNames"}
    LoggedNames.seen, LoggedNames.summarised = set(), {}
    result = train(cfg)
    return set(LoggedNames.seen), dict(LoggedNames.summarised), result["metrics"]


def test_every_logged_metric_of_a_tiny_run_has_a_registered_family(tiny_run_names) -> None:
    from siamese_retrieval.registry import METRICS
    from siamese_retrieval.run_outputs import shown_metrics
    best_mode = METRICS.best_mode

    seen, summarised, metrics = tiny_run_names
    names = seen | set(metrics)
    assert {"train/loss", "val/loss", "val/mAP", "test/precision@10", "test/range_acc@0.01"} <= names
    for name in sorted(names):
        base = name.rsplit("/", 1)[-1].split("@", 1)[0]
        family = METRICS.family(name)
        if base in NO_FAMILY or base.startswith("loss_"):
            assert family is None and best_mode(name) is None, name
            continue
        assert family is not None and family.name == base, f"{name}: no registered metric family"
        assert best_mode(name) == DIRECTIONS[base] == prefix_rule_best_mode(name), name
        assert family.meta["at_k"] == ("@" in name) or base == "mAP", name  # mAP: mAP@k when streaming
    # BestValSummary: a best summary for each val metric the run logs, in the direction of its family
    assert set(summarised) == {n for n in names if n.startswith("val/") and best_mode(n)}
    assert summarised == {n: prefix_rule_best_mode(n) for n in summarised}
    # the results table: the same rows as before the registry, in the same order
    assert shown_metrics(metrics) == TABLE_ROWS


def test_best_mode_and_the_table_rows_follow_the_registry() -> None:
    from siamese_retrieval.run_outputs import SHOWN_METRICS, shown_metrics
    from siamese_retrieval.registry import METRICS
    best_mode = METRICS.best_mode

    assert list(SHOWN_METRICS) == TABLE_ROWS
    for name in ["val/loss", "train/loss", "test/mAP@100", "all/ndcg@5", "before_rerank/precision@1", "loss",
                 "val/n_queries", "train/loss_contrastive", "test/rerank/verified_fraction", "epoch", "lr-Adam"]:
        assert best_mode(name) == prefix_rule_best_mode(name), name
    assert best_mode("test/before_rerank/recall@5") == "max"  # any path before the name: its family's direction
    # streaming evaluation: every logged mAP@k after the fixed rows, sorted (as the table always did)
    streamed = {"val/mAP@100": 0.3, "test/mAP@20": 0.2, "test/before_rerank/mAP@50": 0.1}
    assert shown_metrics(streamed) == [*TABLE_ROWS, "mAP@100", "mAP@20"]


def _hit_rate() -> None:
    """A researcher's metric family (registered by the test below, removed after)."""


def _median_rank() -> None:
    """Another one, lower is better."""


def test_a_new_metric_family_is_picked_up_without_editing_the_readers(capsys: pytest.CaptureFixture[str]) -> None:
    from siamese_retrieval.registry import METRICS
    from siamese_retrieval.run_outputs import print_results, shown_metrics
    best_mode = METRICS.best_mode

    with pytest.raises(ValueError, match="higher_is_better"):
        METRICS.register("no_direction", at_k=False, description="x")(_hit_rate)
    with pytest.raises(ValueError, match="row"):
        METRICS.register("no_row", higher_is_better=True, at_k=False, shown=("no_row",), description="x")(_hit_rate)
    assert "no_direction" not in METRICS and "no_row" not in METRICS
    assert best_mode("val/hit_rate@3") is None and best_mode("val/median_rank") is None
    try:
        METRICS.register("hit_rate", higher_is_better=True, at_k=True, shown=("hit_rate@3",), row=25,
                         description="queries with a positive among the top k, per query")(_hit_rate)
        METRICS.register("median_rank", higher_is_better=False, at_k=False, shown=("median_rank",), row=60,
                         description="median rank of the first positive")(_median_rank)
        assert best_mode("val/hit_rate@3") == "max" and best_mode("test/hit_rate@10") == "max"
        assert best_mode("val/median_rank") == "min"
        assert shown_metrics() == [*TABLE_ROWS[:6], "hit_rate@3", *TABLE_ROWS[6:], "median_rank"]
        print_results({"test/hit_rate@3": 0.25, "test/median_rank": 4.0, "test/recall@1": 0.5}, title="t",
                      stages=("test",))
        rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
        assert rows == ["recall@1", "hit_rate@3", "median_rank"]
    finally:
        METRICS.unregister("hit_rate")
        METRICS.unregister("median_rank")
    assert shown_metrics() == TABLE_ROWS and best_mode("val/hit_rate@3") is None
