"""Mutation audit of the default test suite: plant realistic one-line bugs, see which the tests catch.

    python experiments/mutation_audit.py                 # every mutation, each against its own tests (~20 min, 2 cores)
    python experiments/mutation_audit.py --list          # the mutations (id, area, file, bug, tests); runs nothing
    python experiments/mutation_audit.py --only ID [ID ...]   # some of them
    python experiments/mutation_audit.py --keep          # leave the temporary copies (paths are printed)
    python experiments/mutation_audit.py --full-suite    # each mutation against the whole default suite (slow)
    python experiments/mutation_audit.py --drop-tests tests/test_known_answers   # what the REST of the suite catches
    python experiments/mutation_audit.py --only-tests tests/test_known_answers   # what that file catches on its own

Each entry of `MUTATIONS` is one realistic single-line bug in the logic that matters (an off-by-one, `<` for
`<=`, a wrong denominator, a missing `% 360`, an inverted mask, a wrong axis, a dropped condition, ...): an
`old` snippet that must occur EXACTLY once in its file (the script stops with a clear message otherwise, so a
refactoring that moves the code is noticed instead of silently auditing nothing), its `new` replacement, and
the default-suite tests (files or node ids, never `@pytest.mark.slow` ones: checked by a --collect-only run
with -m "not slow" before anything else) that should catch it.

How a mutation is run: the working tree is first copied once to a snapshot (the files `git ls-files` lists plus
the untracked, non-ignored ones of `git ls-files --others --exclude-standard`, so new tests are included), so
that edits made to the working tree while the audit runs cannot reach some copies and not others; each
mutation then gets a fresh copy of that snapshot, the mutation is applied in the copy only, and

    python -m pytest -q -x -n 0 -p no:cacheprovider -m "not slow" <its tests>

runs with cwd = the copy and PYTHONPATH=<copy>/src:<copy>, so that the copy's package is the one imported.
The virtual environment has the working tree installed in editable mode, and its import hook also maps
`siamese_retrieval.conf` onto the WORKING TREE's conf/ (pyproject's package-dir), which PYTHONPATH does not
override: every copy therefore gets a link src/siamese_retrieval/conf -> ../../conf, and the audit checks once
that both `siamese_retrieval` and `siamese_retrieval.conf` import from the copy (it stops otherwise).

Exit code 1 (a test failed) = caught; 0 = SURVIVED; 2 with a collection error = caught too, flagged as such
(the baseline collected the same tests from the same snapshot, so the mutation broke an import: prefer
mutations that keep the code importable); anything else (usage error, no test ran, timeout) = ERROR, shown with
pytest's last lines. Before any mutation a baseline runs the union of all the selected tests on an unmutated
copy, and the audit stops if it fails. The repository itself is never modified.

Output: one line per mutation as it finishes (with the failing assertion), then a table (id, area, file,
caught/SURVIVED, seconds, the first failing test), the score line `caught X of Y` and the total time; exit
status 1 when any mutation was not caught.

To add a mutation: append an `M(...)` to MUTATIONS (keep `new` a plausible bug that keeps the code importable;
a change that cannot alter behaviour is no mutation), run `--only ITS_ID`; if it survives, write a known-answer
test (expected values worked out by hand, tests/test_known_answers.py) that kills it and list it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KA = "tests/test_known_answers.py"


@dataclass(frozen=True)
class Mutation:
    id: str
    area: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # default-suite test files / node ids that should catch it
    description: str


def M(id: str, area: str, file: str, old: str, new: str, tests: list[str] | tuple[str, ...],
      description: str) -> Mutation:
    return Mutation(id, area, file, old, new, tuple(tests), description)


METRICS = "src/siamese_retrieval/retrieval/metrics.py"
RANKING = "src/siamese_retrieval/retrieval/ranking.py"
INDEX = "src/siamese_retrieval/retrieval/index.py"
TRUTH = "src/siamese_retrieval/data/ground_truth.py"
LAYOUTS = "src/siamese_retrieval/data/layouts.py"
VIEWS = "src/siamese_retrieval/data/train_views.py"
PLACES = "src/siamese_retrieval/data/place_batches.py"
SPLITS = "src/siamese_retrieval/data/splits.py"
MINING = "src/siamese_retrieval/models/mining.py"
MSLOSS = "src/siamese_retrieval/models/metric_losses.py"
KPSET = "src/siamese_retrieval/models/keypoint_set.py"
TRUST = "src/siamese_retrieval/trust.py"
IO = "src/siamese_retrieval/io_utils.py"
CKPT = "src/siamese_retrieval/checkpoints.py"

T_METRICS = "tests/test_retrieval_metrics.py"
T_STREAM = "tests/test_streaming.py"
T_ENGINE = "tests/test_retrieval_engine.py"
T_LAYOUTS = "tests/test_layouts.py"
T_VIEWS = "tests/test_train_views.py"
T_PLACES = "tests/test_place_batches.py"
T_LOSSES = "tests/test_losses.py"
T_KPSET = "tests/test_keypoint_set.py"
T_INDEX = "tests/test_index.py"
T_SPLITS = "tests/test_splits_pairs.py"
T_FUSED = "tests/test_fused_rerank.py"
T_TRUST = "tests/test_trust.py"
T_LINKS = "tests/test_cache_symlinks.py"
T_MEMMAP = "tests/test_memmap_caches.py"


MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ streaming top-k normalisation
    M("topk-ap-norm", "streaming top-k", METRICS,
      "norm = torch.clamp(n_pos, max=k).double().clamp(min=1)",
      "norm = n_pos.double().clamp(min=1)",
      [T_STREAM, f"{KA}::test_map_at_k_with_more_positives_than_k"],
      "AP@k divided by n_pos instead of min(k, n_pos): a query with more positives than k can never score 1"),
    M("topk-npos-in-topk", "streaming top-k", RANKING,
      "n_pos = self.truth.n_positives(qi)",
      "n_pos = sim.sum(axis=1)",
      [T_STREAM, f"{KA}::test_streaming_metrics_count_positives_beyond_the_top_k"],
      "positives counted in the searched top k only, not in the whole database (AP@k inflated, misses dropped)"),
    M("topk-mean-denominator", "streaming top-k", METRICS,
      "n_valid = (self.n_queries - self.n_without_positive).double()",
      "n_valid = self.n_queries.double()",
      [T_METRICS, f"{KA}::test_queries_without_positive_are_left_out_of_every_mean"],
      "queries without a positive kept in the denominator of every mean"),
    M("topk-has-positive", "streaming top-k", METRICS,
      'out["has_positive"] = n_pos > 0',
      'out["has_positive"] = n_pos >= 0',
      [T_METRICS, f"{KA}::test_queries_without_positive_are_left_out_of_every_mean"],
      "a query with zero positives counted as having one (< vs <=)"),
    M("topk-first-positive-bound", "streaming top-k", RANKING,
      "first = np.where(has, sim.argmax(axis=1) + 1, np.where(n_pos > 0, k + 1, 0))",
      "first = np.where(has, sim.argmax(axis=1) + 1, np.where(n_pos > 0, k, 0))",
      [T_STREAM, f"{KA}::test_first_positive_rank_beyond_the_top_k_is_k_plus_one"],
      "first-positive rank of a query whose positives lie beyond the top k reported as k, not k + 1"),
    # ------------------------------------------------------------------ metrics
    M("metrics-precision-denominator", "metrics", METRICS,
      'out[f"precision@{c}"] = hits_c / c  # divided by c',
      'out[f"precision@{c}"] = hits_c / min(c, k)  # divided by c',
      [T_METRICS, f"{KA}::test_precision_at_k_beyond_a_small_database_divides_by_k"],
      "precision@c divided by min(c, n_db) instead of c when the database is smaller than c"),
    M("metrics-hits-off-by-one", "metrics", METRICS,
      "hits_c = hits[:, min(c, k) - 1].double()",
      "hits_c = hits[:, min(c, k - 1)].double()",
      [T_METRICS, f"{KA}::test_hand_worked_ranking_metrics"],
      "precision@c / recall@c read the top c + 1 (off-by-one index)"),
    M("metrics-ndcg-discount", "metrics", METRICS,
      "discount = 1.0 / torch.log2(torch.arange(kk, device=rel.device, dtype=torch.float64) + 2.0)",
      "discount = 1.0 / torch.log2(torch.arange(kk, device=rel.device, dtype=torch.float64) + 1.0)",
      [T_METRICS, f"{KA}::test_hand_worked_ranking_metrics"],
      "nDCG discount log2(rank) instead of log2(rank + 1) (infinite weight at rank 1)"),
    M("metrics-ndcg-ideal", "metrics", METRICS,
      "gain, ideal = fov.gather(1, order[:, :kk]), fov.topk(kk, dim=1).values",
      "gain, ideal = fov.gather(1, order[:, :kk]), fov.gather(1, order[:, :kk]).sort(dim=1, descending=True).values",
      [T_METRICS, f"{KA}::test_hand_worked_ranking_metrics"],
      "ideal DCG from the retrieved top k re-sorted instead of the whole row's largest fovs"),
    M("metrics-ap-every-rank", "metrics", METRICS,
      'out["AP"] = ((hits / ranks) * relf).sum(1).double() / norm',
      'out["AP"] = (hits / ranks).sum(1).double() / norm',
      [T_METRICS, f"{KA}::test_hand_worked_ranking_metrics"],
      "AP sums precision at every rank, not only at the ranks of positives"),
    # ------------------------------------------------------------------ radius and heading rules
    M("radius-strict", "radius/heading", TRUTH,
      "keep = ((q_xy[qi] - db_xy[di]) ** 2).sum(axis=1) <= radius_m**2",
      "keep = ((q_xy[qi] - db_xy[di]) ** 2).sum(axis=1) < radius_m**2",
      [T_STREAM, T_LAYOUTS, f"{KA}::test_radius_boundary_is_inclusive"],
      "a pair exactly on the radius is not a positive (< instead of <=)"),
    M("radius-no-slack", "radius/heading", TRUTH,
      "(radius_m + 1.0) ** 2)",
      "radius_m ** 2)",
      [T_STREAM, T_LAYOUTS, f"{KA}::test_radius_boundary_is_inclusive"],
      "FAISS range search without the 1 m slack: its strict < drops pairs exactly on the radius"),
    M("heading-no-wrap", "radius/heading", TRUTH,
      "return np.abs((np.asarray(a, np.float64) - np.asarray(b, np.float64) + 180.0) % 360.0 - 180.0)",
      "return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))",
      [T_LAYOUTS, f"{KA}::test_heading_difference_wraps_around_north"],
      "heading difference without wrapping around 360 (359 and 1 come out 358 apart)"),
    M("heading-strict", "radius/heading", TRUTH,
      "keep &= heading_difference(q_h[qi], db_h[di]) <= float(max_heading_deg)",
      "keep &= heading_difference(q_h[qi], db_h[di]) < float(max_heading_deg)",
      [T_LAYOUTS, f"{KA}::test_heading_rule_is_inclusive_and_wraps"],
      "a heading difference exactly at max_heading_deg is refused (< instead of <=)"),
    M("vpr-heading-mod", "radius/heading", LAYOUTS,
      'heading = _finite(fields["heading"], "heading (field 9 of the file name)", str(path)) % 360.0',
      'heading = _finite(fields["heading"], "heading (field 9 of the file name)", str(path))',
      [T_LAYOUTS, f"{KA}::test_vpr_file_name_heading_is_taken_modulo_360"],
      "VPR file-name heading not reduced modulo 360 (370 stays 370, -10 stays -10 in loc)"),
    M("msls-heading-mod", "radius/heading", LAYOUTS,
      '_finite(raw_row["ca"], f"ca (compass angle) of key {key!r}", f"{raw_path}: line {raw_line}") % 360.0',
      '_finite(raw_row["ca"], f"ca (compass angle) of key {key!r}", f"{raw_path}: line {raw_line}")',
      [T_LAYOUTS, f"{KA}::test_msls_compass_angle_is_taken_modulo_360_and_radius_is_inclusive"],
      "MSLS compass angle (raw.csv ca) not reduced modulo 360"),
    # ------------------------------------------------------------------ training-only city
    M("views-seed-inverted", "train views", VIEWS,
      "if train_city.seed == eval_city.seed and shared:",
      "if train_city.seed != eval_city.seed and shared:",
      ["tests/test_train_views.py::test_a_training_city_on_an_evaluation_street_is_refused",
       "tests/test_train_views.py::test_the_training_city_starts_after_the_evaluation_city"],
      "overlap refused for other seeds and accepted for the same seed (inverted condition)"),
    M("views-one-shared-street", "train views", VIEWS,
      "shared = set(eval_city.streets) & set(train_city.streets)",
      "shared = set(eval_city.streets[:-1]) & set(train_city.streets)",
      ["tests/test_train_views.py::test_a_training_city_on_an_evaluation_street_is_refused",
       "tests/test_train_views.py::test_the_training_city_starts_after_the_evaluation_city",
       f"{KA}::test_training_city_sharing_only_the_last_street_is_refused"],
      "the evaluation city's last street left out of the overlap check (off-by-one on the range end)"),
    M("views-first-street", "train views", VIEWS,
      'values["first_street"] = eval_city.first_street + eval_city.n_streets',
      'values["first_street"] = eval_city.first_street + eval_city.n_streets - 1',
      ["tests/test_train_views.py::test_the_training_city_starts_after_the_evaluation_city"],
      "default training city starts ON the evaluation city's last street (off-by-one)"),
    M("views-join-offset", "train views", VIEWS,
      "np.concatenate([a[1], b[1] + md])",
      "np.concatenate([a[1], b[1] + mq])",
      [T_VIEWS, f"{KA}::test_joined_views_offset_the_training_city_database_ids"],
      "training city's database ids offset by the number of evaluation QUERIES instead of database images"),
    # ------------------------------------------------------------------ place batches
    M("places-no-query-rule", "place batches", PLACES,
      "return not ((self._stamp_db[self.near_db.row(p)] == b).any() or (self._stamp_q[self.near_q.row(p)] == b).any())",
      "return not (self._stamp_db[self.near_db.row(p)] == b).any()",
      [T_PLACES, f"{KA}::test_places_whose_views_one_query_sees_are_kept_apart"],
      "overlap rule drops the query side: places whose views one query sees may share a batch"),
    M("places-near-db-views-only", "place batches", PLACES,
      "near = usable[row]",
      "near = keep",
      [T_PLACES],
      "places compared on their views only, not on every database image their anchor overlaps"),
    M("places-min-fov-strict", "place batches", PLACES,
      "cand = np.isin(ids, db_idx) & (fov >= self.cfg.min_fov)",
      "cand = np.isin(ids, db_idx) & (fov > self.cfg.min_fov)",
      [T_PLACES, f"{KA}::test_a_view_exactly_at_min_fov_counts"],
      "a database image with fov exactly min_fov is not a view (> instead of >=)"),
    M("places-deferred-lost", "place batches", PLACES,
      "remaining = deferred + remaining[i:]",
      "remaining = remaining[i:]",
      [T_PLACES, f"{KA}::test_random_packing_defers_overlapping_places_to_a_later_batch"],
      "places deferred because they overlap the open batch are dropped for the epoch"),
    M("places-negatives-own-place", "place batches", PLACES,
      "others = p + np.flatnonzero(view_place != i)",
      "others = p + np.flatnonzero(view_place == i)",
      ["tests/test_place_batches.py::test_batches_are_p_places_of_2_to_k_views"],
      "pair negatives drawn from the anchor's own views (inverted mask)"),
    # ------------------------------------------------------------------ miners
    M("mining-max-fov-inclusive", "miner", MINING,
      "negative = torch.isfinite(fov) & (fov < self.max_fov)",
      "negative = torch.isfinite(fov) & (fov <= self.max_fov)",
      [T_LOSSES, f"{KA}::test_batch_hard_miner_boundary_and_denominators"],
      "a cross pair with fov exactly max_fov (0.5 = sim 1) mined as a negative"),
    M("mining-row-denominator", "miner", MINING,
      "per_row = (top.clamp(min=0.0) * valid).sum(1) / valid.sum(1).clamp(min=1.0)",
      "per_row = (top.clamp(min=0.0) * valid).sum(1) / k",
      [T_LOSSES, f"{KA}::test_batch_hard_miner_boundary_and_denominators"],
      "a row's push averaged over k instead of over the negatives it has"),
    M("mining-batch-denominator", "miner", MINING,
      "return (per_row * rows).sum() / rows.sum().clamp(min=1.0)",
      "return per_row.mean()",
      [T_LOSSES],
      "mined term averaged over every row, not over the rows that have a negative"),
    M("mining-cross-transposed", "miner", MINING,
      "cross = (q[:, None] << 32) | d[None, :]",
      "cross = (q[None, :] << 32) | d[:, None]",
      [T_LOSSES],
      "known cross fov built transposed (query j x database i)"),
    M("ms-miner-dropped", "miner", MSLOSS,
      "return self.loss(embeddings, labels, pairs)",
      "return self.loss(embeddings, labels)",
      ["tests/test_place_batches.py::test_multi_similarity_matches_a_hand_computation_and_trains",
       f"{KA}::test_multi_similarity_miner_keeps_only_the_hard_pairs"],
      "multi-similarity loss ignores the miner's pairs (every pair counts)"),
    M("ms-pos-fov-strict", "miner", MSLOSS,
      "positive = out.fov.float() >= self.pos_fov",
      "positive = out.fov.float() > self.pos_fov",
      ["tests/test_place_batches.py::test_multi_similarity_matches_a_hand_computation_and_trains",
       f"{KA}::test_multi_similarity_pair_batch_positive_at_exactly_pos_fov"],
      "pair-batch multi-similarity: fov exactly pos_fov counted as a negative"),
    # ------------------------------------------------------------------ keypoint_set masks
    M("kpset-attn-mask-axis", "keypoint_set masks", KPSET,
      "attn_mask=key_mask[:, None, None, :]",
      "attn_mask=key_mask[:, None, :, None]",
      [T_KPSET, f"{KA}::test_keypoint_set_padding_amount_does_not_change_the_embedding"],
      "self-attention mask on the query axis instead of the key axis (padded keys are read)"),
    M("kpset-key-mask-all", "keypoint_set masks", KPSET,
      "key_mask = mask | ~mask.any(dim=1, keepdim=True)",
      "key_mask = mask | ~mask.all(dim=1, keepdim=True)",
      [T_KPSET, f"{KA}::test_keypoint_set_padding_amount_does_not_change_the_embedding"],
      "every image with ANY padding attends to its padding (any -> all)"),
    M("kpset-mean-denominator", "keypoint_set masks", KPSET,
      "return (x * m).sum(1) / m.sum(1).clamp(min=1.0)",
      "return (x * m).sum(1) / m.shape[1]",
      [T_KPSET, f"{KA}::test_masked_poolings_by_hand"],
      "masked mean divided by N (padding included) instead of the number of valid keypoints"),
    M("kpset-gem-weights", "keypoint_set masks", KPSET,
      "weights = m / m.sum(1, keepdim=True).clamp(min=1.0)",
      "weights = m / m.shape[1]",
      [T_KPSET, f"{KA}::test_masked_poolings_by_hand"],
      "GeM weights 1/N (padding in the denominator) instead of 1/n_valid"),
    M("kpset-attention-pool-unmasked", "keypoint_set masks", KPSET,
      "w = masked_softmax(logits, mask[:, None, :], dim=-1)",
      "w = logits.softmax(dim=-1)",
      [T_KPSET, f"{KA}::test_keypoint_set_padding_amount_does_not_change_the_embedding"],
      "attention pooling's softmax over padded keypoints too (mask dropped)"),
    M("kpset-softmax-inverted", "keypoint_set masks", KPSET,
      "filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)",
      "filled = logits.masked_fill(mask, torch.finfo(logits.dtype).min)",
      [T_KPSET, f"{KA}::test_masked_poolings_by_hand"],
      "masked_softmax fills the VALID positions (inverted mask)"),
    M("kpset-netvlad-unmasked", "keypoint_set masks", KPSET,
      "a = self.assign(x).softmax(dim=-1) * mask.unsqueeze(-1).float()",
      "a = self.assign(x).softmax(dim=-1)",
      [T_KPSET, f"{KA}::test_keypoint_set_padding_amount_does_not_change_the_embedding"],
      "NetVLAD soft assignment not masked: padded keypoints add residuals"),
    M("kpset-feat-not-zeroed", "keypoint_set masks", KPSET,
      "feat = torch.where(keep, feat.float(), torch.zeros((), device=feat.device))",
      "feat = feat.float()",
      [T_KPSET],
      "padded geometry not zeroed at the input (NaN in a padded row reaches the embedding)"),
    # ------------------------------------------------------------------ compressed index, full ranking
    M("index-full-ranking-ivf-only", "index/full ranking", RANKING,
      'if full_ranking and cfg.kind != "flat":',
      'if full_ranking and cfg.kind == "ivf":',
      [T_STREAM, T_ENGINE, f"{KA}::test_full_ranking_through_compressed_indexes_ranks_every_item"],
      "a full ranking probes every list only for kind ivf (ivfpq / factory keep their nprobe)"),
    M("index-set-nprobe-off-by-one", "index/full ranking", INDEX,
      "part.nprobe = max(1, min(int(nprobe), int(part.nlist)))",
      "part.nprobe = max(1, min(int(nprobe), int(part.nlist) - 1))",
      [T_INDEX, f"{KA}::test_full_ranking_through_compressed_indexes_ranks_every_item"],
      "nprobe capped at nlist - 1: a 'probe everything' search misses one inverted list"),
    M("index-build-nprobe-off-by-one", "index/full ranking", INDEX,
      "index.nprobe = min(int(cfg.nprobe), nlist)",
      "index.nprobe = min(int(cfg.nprobe), nlist - 1)",
      [T_INDEX, f"{KA}::test_full_ranking_through_compressed_indexes_ranks_every_item"],
      "ivf / ivfpq built with nprobe capped at nlist - 1 (full ranking misses a list)"),
    M("index-tune-bound-sign", "index/full ranking", INDEX,
      "return mean - z * se >= target_recall",
      "return mean + z * se >= target_recall",
      [T_INDEX, f"{KA}::test_tuning_uses_the_lower_confidence_bound"],
      "tuning accepts a setting on the UPPER confidence bound of its recall (sign error)"),
    # ------------------------------------------------------------------ sparse ground truth
    M("sparse-lookup-match", "sparse ground truth", TRUTH,
      "found = valid & (keys_sorted[pos] == keys)",
      "found = valid & (keys_sorted[pos] >= keys)",
      [T_STREAM],
      "sparse lookup accepts the next stored pair, not only an exact (query, id) match"),
    M("sparse-lookup-negative-ids", "sparse ground truth", TRUTH,
      "valid = (ids >= 0) & (ids < self.n_db)",
      "valid = ids < self.n_db",
      [T_STREAM, f"{KA}::test_sparse_lookup_of_missing_ids"],
      "FAISS's -1 (no result) not treated as invalid in the sparse lookup"),
    M("sparse-npos-all-pairs", "sparse ground truth", TRUTH,
      "np.bincount(row[self.sim], minlength=self.n_query)",
      "np.bincount(row, minlength=self.n_query)",
      [T_STREAM, f"{KA}::test_sparse_n_positives_counts_sim_pairs_only"],
      "n_positives counts every stored pair (fov > 0 with sim 0 too)"),
    M("dense-lookup-invalid", "sparse ground truth", TRUTH,
      "if not valid.all():",
      "if valid.all():",
      [T_STREAM, f"{KA}::test_sparse_lookup_of_missing_ids"],
      "dense lookup keeps -1 ids as database image 0 (inverted condition)"),
    # ------------------------------------------------------------------ splits
    M("splits-val-overlap", "splits", SPLITS,
      "eval_q = np.concatenate([idx[1], idx[2]])",
      "eval_q = idx[2]",
      [T_SPLITS, f"{KA}::test_split_excludes_database_images_seen_by_val_and_test_queries"],
      "train_db excludes only images that TEST queries overlap (val overlap leaks)"),
    M("splits-floor", "splits", SPLITS,
      "cells = np.floor(loc[:, :2] / float(cell_size_m)).astype(np.int64)",
      "cells = (loc[:, :2] / float(cell_size_m)).astype(np.int64)",
      [T_SPLITS],
      "grid cell by truncation toward zero (cells -1 and 0 merge)"),
    M("splits-last-places", "splits", SPLITS,
      "if len(empty) and left <= len(empty):",
      "if len(empty) and left < len(empty):",
      [T_SPLITS, f"{KA}::test_assign_places_fills_every_split_with_the_last_places"],
      "the last places are not reserved for the still-empty splits (off-by-one)"),
    # ------------------------------------------------------------------ fused re-ranking
    M("fused-min-inliers", "fused re-ranking", RANKING,
      "return (inliers >= self.min_inliers) & (inliers >= median + self.outlier_z * spread)",
      "return (inliers > self.min_inliers) & (inliers >= median + self.outlier_z * spread)",
      [T_FUSED, f"{KA}::test_fused_reranker_by_hand"],
      "a candidate with exactly min_inliers is not verified"),
    M("fused-id-zero", "fused re-ranking", RANKING,
      "inliers = np.where(candidates >= 0, inliers, 0.0)",
      "inliers = np.where(candidates > 0, inliers, 0.0)",
      [T_FUSED, f"{KA}::test_fused_reranker_by_hand"],
      "database image 0 treated as FAISS's missing id -1 (its inliers dropped)"),
    M("fused-skip-inverted", "fused re-ranking", RANKING,
      "todo = np.flatnonzero(scores[:, 0] - scores[:, 1] <= self.skip_margin)",
      "todo = np.flatnonzero(scores[:, 0] - scores[:, 1] > self.skip_margin)",
      [T_FUSED],
      "verifies the confident queries and skips the uncertain ones (inverted)"),
    # ------------------------------------------------------------------ trust allowlist
    M("trust-allow-or", "trust allowlist", TRUST,
      "return target in set(allow) and user_class(target) is not None",
      "return target in set(allow) or user_class(target) is not None",
      [T_TRUST + "::test_trust_allow_accepts_named_classes_only"],
      "any importable class allowed, listed or not (and -> or)"),
    M("trust-family-subclass", "trust allowlist", TRUST,
      "return isinstance(candidate, type) and issubclass(candidate, base) and candidate is not base",
      "return isinstance(candidate, type) and candidate is not base",
      [T_TRUST + "::test_allowlist_accepts_the_projects_own_targets_only",
       f"{KA}::test_trust_refuses_non_optimizer_classes_in_torch_optim_and_os_classes_by_alias"],
      "any class found in torch.optim / lr_scheduler allowed, optimizer or not"),
    M("trust-alias-never", "trust allowlist", TRUST,
      'if not isinstance(candidate, type) or _never(f"{candidate.__module__}.{candidate.__qualname__}"):',
      "if not isinstance(candidate, type):",
      [T_TRUST + "::test_trust_allow_accepts_named_classes_only",
       f"{KA}::test_trust_refuses_non_optimizer_classes_in_torch_optim_and_os_classes_by_alias"],
      "an operating-system class re-exported by a harmless module (x.Path = pathlib.Path) can be allowed"),
    # ------------------------------------------------------------------ cache atomicity
    M("cache-unlink-target", "cache atomicity", IO,
      "os.unlink(tmp_path)  # gone after the rename",
      "os.unlink(path)  # gone after the rename",
      [T_LINKS, f"{KA}::test_atomic_write_replaces_whole_or_not_at_all"],
      "the cleanup unlinks the published file instead of the temporary"),
    M("cache-keep-existing-inverted", "cache atomicity", IO,
      "if keep_existing(path):",
      "if not keep_existing(path):",
      [T_MEMMAP],
      "a concurrent writer's complete cache is replaced and an incomplete one kept (inverted)"),
    M("cache-own-pid", "cache atomicity", IO,
      "return True  # another thread of this process may be writing",
      "return False  # another thread of this process may be writing",
      [T_MEMMAP, f"{KA}::test_a_live_writers_temporary_is_not_removed"],
      "this process's own in-flight temporaries deleted as stale"),
    # ------------------------------------------------------------------ checkpoint inputs
    M("ckpt-check-encoder-only", "checkpoint inputs", CKPT,
      'check_targets(hparams, f"checkpoint {path}"',
      'check_targets(hparams["encoder"], f"checkpoint {path}"',
      ["tests/test_trust.py::test_foreign_targets_are_refused_before_anything_is_built",
       f"{KA}::test_read_checkpoint_checks_every_target_and_loads_weights_only"],
      "only the encoder subtree is checked: a foreign target in inputs / loss passes"),
    M("ckpt-weights-only", "checkpoint inputs", CKPT,
      'raw = torch.load(path, map_location="cpu", weights_only=True)',
      'raw = torch.load(path, map_location="cpu", weights_only=False)',
      ["tests/test_trust.py::test_foreign_targets_are_refused_before_anything_is_built",
       f"{KA}::test_read_checkpoint_checks_every_target_and_loads_weights_only"],
      "checkpoint unpickled with weights_only=False (arbitrary code runs on load)"),
    M("ckpt-inputs-allow-dropped", "checkpoint inputs", CKPT,
      'return checked_instantiate(self.inputs_cfg, f"checkpoint {self.path}: inputs", self.trust_allow)',
      'return checked_instantiate(self.inputs_cfg, f"checkpoint {self.path}: inputs")',
      [T_TRUST + "::test_trust_allow_accepts_named_classes_only",
       f"{KA}::test_checkpoint_inputs_are_built_with_the_users_allow_list"],
      "the input builder is checked without the user's trust.allow (an allowed class is refused)"),
]


# ----------------------------------------------------------------------------------------- machinery


def git_files(repo: Path) -> list[str]:
    """Tracked files plus untracked, non-ignored ones (relative paths that exist in the working tree)."""
    out: list[str] = []
    for args in (["ls-files", "-z"], ["ls-files", "-z", "--others", "--exclude-standard"]):
        res = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
        out += [p for p in res.stdout.decode().split("\0") if p]
    seen, files = set(), []
    for p in out:
        if p not in seen and os.path.lexists(repo / p):
            seen.add(p)
            files.append(p)
    return files


def make_copy(repo: Path, files: list[str], parent: Path, name: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    for rel in files:
        src, dst = repo / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    link_package_dirs(dest)
    return dest


def package_dirs(repo: Path) -> dict[str, str]:
    """pyproject's [tool.setuptools.package-dir] entries other than the root one, e.g.
    {"siamese_retrieval.conf": "conf"}: packages that live outside src/ in the checkout."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        return {}
    path = repo / "pyproject.toml"
    if not path.is_file():
        return {}
    dirs = tomllib.loads(path.read_text()).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {pkg: d for pkg, d in dirs.items() if pkg}


def link_package_dirs(copy: Path) -> None:
    """Make the copy self-contained: the editable install maps e.g. `siamese_retrieval.conf` onto the WORKING
    TREE's conf/ through an import hook, which the copy's PYTHONPATH does not override (a package that is not
    under the copy's src/ is looked up by that hook). A link src/siamese_retrieval/conf -> ../../conf in the copy
    makes the copy's own folder the one that imports."""
    for pkg, folder in package_dirs(copy).items():
        link = copy / "src" / Path(*pkg.split("."))
        target = copy / folder
        if target.is_dir() and not os.path.lexists(link) and link.parent.is_dir():
            os.symlink(os.path.relpath(target, link.parent), link)


def check_mutations(repo: Path, mutations: list[Mutation]) -> None:
    """Every `old` occurs exactly once in its file and differs from `new`; ids are unique."""
    problems = []
    ids = [m.id for m in mutations]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"duplicate mutation id {dup!r}")
    for m in mutations:
        path = repo / m.file
        if not path.is_file():
            problems.append(f"{m.id}: file {m.file} not found")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.id}: the old snippet occurs {count} times in {m.file} (must be exactly once): "
                            f"{m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.id}: new == old")
        if not m.tests:
            problems.append(f"{m.id}: no tests listed")
    if problems:
        sys.exit("mutation_audit: bad mutation list:\n  " + "\n  ".join(problems))


def apply(copy: Path, m: Mutation) -> None:
    path = copy / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation_audit: {m.id}: snippet not found exactly once in the copy's {m.file}")
    path.write_text(text.replace(m.old, m.new))


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), str(copy)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "250"  # pytest trims its short summary lines to the terminal width
    env.setdefault("WANDB_MODE", "offline")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_isolation(copy: Path) -> None:
    """The copy's package (and its configs, `siamese_retrieval.conf`) must be what imports, not the editable
    install of the working tree; the audit stops otherwise."""
    names = ["siamese_retrieval", *package_dirs(copy)]
    code = ("import importlib.util, sys\n"
            "for name in sys.argv[1:]:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    print(name, spec.origin if spec.origin else list(spec.submodule_search_locations)[0])\n")
    res = subprocess.run([sys.executable, "-c", code, *names], cwd=copy, env=env_for(copy), capture_output=True,
                         text=True, check=False)
    found = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines() if " " in line)
    for name in names:
        where = found.get(name, "")
        if res.returncode != 0 or not where or not os.path.realpath(where).startswith(os.path.realpath(copy) + os.sep):
            sys.exit(f"mutation_audit: in the copy {copy} {name} imports from {where or res.stderr.strip()!r}, "
                     "not from the copy: the audit would test the unmutated working tree; aborting")
        print(f"isolation ok: {name} imports from {where}")


def pytest_cmd(tests: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-m", "not slow", *tests]


def run_pytest(copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str, float]:
    t = time.perf_counter()
    try:
        res = subprocess.run(pytest_cmd(tests), cwd=copy, env=env_for(copy), capture_output=True, text=True,
                             check=False, timeout=timeout)
        rc, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return rc, out, time.perf_counter() - t


def check_collected(copy: Path, tests: list[str]) -> None:
    """Every listed test exists and is in the default suite (a `slow` one is deselected by -m "not slow")."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-n", "0", "-p", "no:cacheprovider",
           "-m", "not slow", *tests]
    res = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, check=False)
    collected = [line.strip() for line in res.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    missing = [t for t in tests if not any(c == t or c.startswith((t + "::", t + "[")) for c in collected)]
    if res.returncode not in (0, 5) or missing:
        print(tail(res.stdout + res.stderr, 20))
        sys.exit("mutation_audit: listed tests that are not in the default suite (missing, or marked slow): "
                 + " ".join(missing))


def first_failure(out: str) -> tuple[str, str]:
    """(node id, message) of the first failing test in pytest's short summary."""
    m = re.search(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", out, flags=re.MULTILINE)
    return (m.group(1), (m.group(2) or "").strip()) if m else ("", "")


def tail(out: str, n: int = 15) -> str:
    return "\n".join("    " + line for line in out.strip().splitlines()[-n:])


def union(tests: list[tuple[str, ...]]) -> list[str]:
    seen: list[str] = []
    for group in tests:
        for t in group:
            if t not in seen:
                seen.append(t)
    # a whole file makes its node ids redundant
    files = {t for t in seen if "::" not in t}
    return [t for t in seen if "::" not in t or t.split("::", 1)[0] not in files]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--list", action="store_true", help="print the mutations and exit (runs nothing)")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutation ids")
    ap.add_argument("--keep", action="store_true", help="leave the temporary copies in place")
    ap.add_argument("--full-suite", action="store_true",
                    help="run the whole default suite per mutation instead of its listed tests (slow)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run (default 1800)")
    ap.add_argument("--drop-tests", nargs="+", default=[], metavar="PREFIX",
                    help="leave out the listed tests starting with PREFIX (e.g. tests/test_known_answers to see "
                         "what the rest of the suite catches)")
    ap.add_argument("--only-tests", nargs="+", default=[], metavar="PREFIX",
                    help="keep only the listed tests starting with PREFIX; mutations left without a test are skipped "
                         "(e.g. tests/test_known_answers: what that file kills on its own)")
    ap.add_argument("--repo", type=Path, default=REPO, help="repository root (default: this script's)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary copies go (default: $TMPDIR)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill ends the pytest child and removes the copies

    repo = args.repo.resolve()
    mutations = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown mutation id(s): {', '.join(unknown)} (see --list)")
        mutations = [m for m in MUTATIONS if m.id in args.only]
    if args.drop_tests:
        def kept(m: Mutation) -> Mutation:
            tests = tuple(t for t in m.tests if not any(t.startswith(p) for p in args.drop_tests))
            return Mutation(m.id, m.area, m.file, m.old, m.new, tests, m.description)
        mutations = [kept(m) for m in mutations]
    if args.only_tests:
        narrowed = [Mutation(m.id, m.area, m.file, m.old, m.new,
                             tuple(t for t in m.tests if any(t.startswith(p) for p in args.only_tests)), m.description)
                    for m in mutations]
        skipped = [m.id for m in narrowed if not m.tests]
        if skipped:
            print(f"no test left (skipped): {' '.join(skipped)}")
        mutations = [m for m in narrowed if m.tests]
    check_mutations(repo, mutations)

    if args.list:
        for m in mutations:
            print(f"{m.id:32s} {m.area:20s} {m.file}\n    bug:   {m.description}\n    tests: {' '.join(m.tests)}")
        print(f"{len(mutations)} mutations, {len({m.area for m in mutations})} areas")
        return 0

    start = time.perf_counter()
    files = git_files(repo)
    parent = Path(tempfile.mkdtemp(prefix="mutation-audit-", dir=args.workdir))
    print(f"{len(mutations)} mutations; {len(files)} files per copy; copies under {parent}")
    rows = []
    try:
        # one snapshot of the working tree, taken now: every copy (the baseline's too) is made from it, so edits
        # made to the working tree while the audit runs cannot mix into some copies and not others
        snapshot = make_copy(repo, files, parent, "snapshot")
        check_mutations(snapshot, mutations)
        base = make_copy(snapshot, files, parent, "baseline")
        check_isolation(base)
        all_tests = [] if args.full_suite else union([m.tests for m in mutations])
        if all_tests:
            check_collected(base, all_tests)
        print(f"baseline: {' '.join(all_tests) or '(the whole default suite)'}", flush=True)
        rc, out, secs = run_pytest(base, all_tests, args.timeout)
        if rc != 0:
            print(tail(out, 40))
            why = f"timed out after {args.timeout:.0f} s" if rc is None else f"exit {rc}"
            sys.exit(f"mutation_audit: the baseline (no mutation) does not pass ({why}); fix that first")
        print(f"baseline passed in {secs:.0f} s", flush=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

        for m in mutations:
            copy = make_copy(snapshot, files, parent, m.id)
            apply(copy, m)
            rc, out, secs = run_pytest(copy, [] if args.full_suite else list(m.tests), args.timeout)
            why = ""
            if rc == 1:
                status, (by, why) = "caught", first_failure(out)
            elif rc == 2 and re.search(r"errors? during collection", out):
                # the baseline collected the same tests from the same snapshot: the mutation broke the import
                status, (by, why) = "caught", first_failure(out)
                by = f"collection error: {by}"
            elif rc == 0:
                status, by = "SURVIVED", ""
            else:
                status, by = "ERROR", ("timeout" if rc is None else f"pytest exit {rc}")
            rows.append((m, status, secs, by))
            print(f"{m.id:32s} {m.area:20s} {status:8s} {secs:6.1f}s  {by}", flush=True)
            if why:
                print(f"    {why[:150]}", flush=True)
            if status == "ERROR":
                print(tail(out))
            if args.keep:
                print(f"    kept: {copy}")
            else:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)

    total = time.perf_counter() - start
    print()
    print(f"{'id':32s} {'area':20s} {'file':44s} {'result':8s} {'secs':>6s}  caught by")
    for m, status, secs, by in rows:
        short = m.file.removeprefix("src/siamese_retrieval/")
        print(f"{m.id:32s} {m.area:20s} {short:44s} {status:8s} {secs:6.1f}  {by}")
    caught = sum(status == "caught" for _, status, _, _ in rows)
    print(f"\ncaught {caught} of {len(rows)}")
    for label in ("SURVIVED", "ERROR"):
        ids = [m.id for m, status, _, _ in rows if status == label]
        if ids:
            print(f"{label}: {' '.join(ids)}")
    print(f"total time {total:.0f} s")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
