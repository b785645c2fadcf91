"""Pair losses and in-batch mining on hand-made batches: values worked out by hand, gradient signs."""

from __future__ import annotations

import math

import pytest
import torch

from siamese_retrieval.models.distance import Distance
from siamese_retrieval.models.losses import (
    BCEHeadLoss,
    ContrastiveLoss,
    GradedContrastiveLoss,
    MSEHeadLoss,
    PairOutput,
)
from siamese_retrieval.models.mining import BatchHardContrastive, known_cross_fov


def pair_batch(
    distance=None, score=None, logits=None, target=(1.0, 0.0, 0.0), fov=None, **extra
) -> PairOutput:
    """A PairOutput whose distance / score / logits are leaves (so their gradients can be read)."""
    n = len(target)

    def leaf(values, default):
        return torch.tensor(values if values is not None else [default] * n, requires_grad=True)

    target_t = torch.tensor(target)
    return PairOutput(
        torch.zeros(n, 2),
        torch.zeros(n, 2),
        leaf(distance, 0.5),
        leaf(logits, 0.0),
        leaf(score, 0.5),
        target_t,
        torch.tensor(fov) if fov is not None else target_t.clone(),
        **extra,
    )


def value_and_grad(loss_fn, out: PairOutput, wrt: str) -> tuple[float, torch.Tensor]:
    loss = loss_fn(out)
    loss.backward()
    return loss.item(), getattr(out, wrt).grad


# --------------------------------------------------------------------------- head losses (the study)


def test_mse_head_loss_by_hand() -> None:
    out = pair_batch(score=[0.8, 0.3, 0.5], target=(1.0, 0.0, 0.0))
    value, grad = value_and_grad(MSEHeadLoss(), out, "score")
    # ((0.8 - 1)^2 + 0.3^2 + 0.5^2) / 3 = (0.04 + 0.09 + 0.25) / 3 = 0.38 / 3
    assert value == pytest.approx(0.38 / 3, abs=1e-6)
    # d/ds = 2 (s - t) / 3 = [-0.4/3, 0.6/3, 1.0/3]: descent raises the positive's score, lowers the negatives'
    assert grad.tolist() == pytest.approx([-0.4 / 3, 0.6 / 3, 1.0 / 3], abs=1e-6)
    assert grad[0] < 0 and (grad[1:] > 0).all()


def test_bce_head_loss_by_hand() -> None:
    ln3 = math.log(3.0)
    out = pair_batch(logits=[0.0, ln3, -ln3], target=(1.0, 0.0, 0.0))
    value, grad = value_and_grad(BCEHeadLoss(), out, "logits")
    # sigmoid = [0.5, 0.75, 0.25]; losses: -ln 0.5 = ln 2, -ln(1 - 0.75) = ln 4, -ln(1 - 0.25) = ln(4/3)
    assert value == pytest.approx((math.log(2) + math.log(4) + math.log(4 / 3)) / 3, abs=1e-6)
    # d/dx = (sigmoid(x) - t) / 3 = [-0.5/3, 0.75/3, 0.25/3]
    assert grad.tolist() == pytest.approx([-0.5 / 3, 0.75 / 3, 0.25 / 3], abs=1e-6)


def test_bce_head_loss_graded_target_minimum() -> None:
    # a graded target of 0.5 at logit 0 (score 0.5) is the optimum: zero gradient
    out = pair_batch(logits=[0.0], target=(0.5,))
    _, grad = value_and_grad(BCEHeadLoss(), out, "logits")
    assert grad.item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- contrastive losses


def test_contrastive_loss_by_hand() -> None:
    out = pair_batch(distance=[0.5, 1.0, 0.2], target=(1.0, 0.0, 0.0))
    value, grad = value_and_grad(ContrastiveLoss(margin=0.5), out, "distance")
    # positive: d^2 = 0.25; negative beyond the margin: max(0, 0.5 - 1.0)^2 = 0; inside: (0.5 - 0.2)^2 = 0.09
    # 0.5 * mean = 0.5 * 0.34 / 3
    assert value == pytest.approx(0.5 * 0.34 / 3, abs=1e-6)
    # d/dd: positive 0.5 * 2d / 3 = 0.5/3 (> 0: descent pulls together); beyond margin 0;
    # inside the margin -0.5 * 2 (m - d) / 3 = -0.3/3 (< 0: descent pushes apart)
    assert grad.tolist() == pytest.approx([0.5 / 3, 0.0, -0.3 / 3], abs=1e-6)


def test_contrastive_loss_thresholds_graded_target() -> None:
    # target > 0.5 counts as a positive, the rest as negatives
    graded = pair_batch(distance=[0.3, 0.3], target=(0.7, 0.4))
    binary = pair_batch(distance=[0.3, 0.3], target=(1.0, 0.0))
    assert ContrastiveLoss(0.5)(graded).item() == pytest.approx(ContrastiveLoss(0.5)(binary).item())


def test_graded_contrastive_loss_by_hand() -> None:
    out = pair_batch(distance=[0.5, 1.0, 0.2], target=(1.0, 0.0, 0.0), fov=[0.75, 0.0, 0.25])
    value, grad = value_and_grad(GradedContrastiveLoss(margin=0.5), out, "distance")
    # pair 0: 0.75 * 0.25 + 0.25 * max(0, 0.5 - 0.5)^2 = 0.1875
    # pair 1: 0 * 1 + 1 * max(0, 0.5 - 1.0)^2 = 0
    # pair 2: 0.25 * 0.04 + 0.75 * (0.5 - 0.2)^2 = 0.01 + 0.0675 = 0.0775
    # 0.5 * (0.1875 + 0 + 0.0775) / 3 = 0.5 * 0.265 / 3
    assert value == pytest.approx(0.5 * 0.265 / 3, abs=1e-6)
    # d/dd pair 0: 0.5 * 0.75 * 2 * 0.5 / 3 = 0.375 / 3 (pull); pair 2: 0.5 * (0.25 * 0.4 - 0.75 * 0.6) / 3
    # = 0.5 * (0.1 - 0.45) / 3 = -0.175 / 3 (mostly a negative: pushed apart)
    assert grad.tolist() == pytest.approx([0.375 / 3, 0.0, -0.175 / 3], abs=1e-6)


def test_graded_equals_contrastive_on_binary_fov() -> None:
    g = torch.Generator().manual_seed(0)
    distance = (torch.rand(64, generator=g) * 1.5).tolist()
    sim = (torch.rand(64, generator=g) > 0.5).float().tolist()
    for margin in (0.3, 0.5, 1.0):
        a = GradedContrastiveLoss(margin)(pair_batch(distance=distance, target=tuple(sim), fov=sim))
        b = ContrastiveLoss(margin)(pair_batch(distance=distance, target=tuple(sim), fov=sim))
        assert a.item() == b.item()  # exactly


# --------------------------------------------------------------------------- in-batch mining


def embedded_batch(emb_q, emb_d, target, fov, **extra) -> PairOutput:
    emb_q = torch.tensor(emb_q, requires_grad=True)
    emb_d = torch.tensor(emb_d, requires_grad=True)
    distance = Distance().pair(emb_q, emb_d)
    logits = -distance + 1.0
    return PairOutput(emb_q, emb_d, distance, logits, torch.sigmoid(logits), torch.tensor(target),
                      torch.tensor(fov), **extra)


def test_positional_pair_output_still_works() -> None:
    out = PairOutput(*(torch.zeros(2) for _ in range(7)))
    assert out.q_idx is None and out.d_idx is None and out.cross_fov is None


def test_mining_by_hand_same_query() -> None:
    # one query (index 0) in two pairs: database 10 is a positive at d = 0.5, database 11 a negative at d = 0.2
    out = embedded_batch([[0.0, 0.0], [0.0, 0.0]], [[0.3, 0.4], [0.0, 0.2]], [1.0, 0.0], [1.0, 0.0],
                         q_idx=torch.tensor([0, 0]), d_idx=torch.tensor([10, 11]))
    base = ContrastiveLoss(0.5)
    # base: 0.5 * (0.5^2 + (0.5 - 0.2)^2) / 2 = 0.5 * 0.34 / 2 = 0.085
    assert base(out).item() == pytest.approx(0.085, abs=1e-6)
    fov = known_cross_fov(out)
    assert fov.tolist() == [[1.0, 0.0], [1.0, 0.0]]  # both rows know both of the query's images
    # each row's hardest (only) negative is database 11 at d = 0.2: 0.5 * (1 - 0) * 0.3^2 = 0.045;
    # mean over the two rows = 0.045; total 0.085 + 0.045 = 0.13
    mined = BatchHardContrastive(base, k=1)
    assert mined.margin == 0.5  # taken from the base loss
    loss = mined(out)
    assert loss.item() == pytest.approx(0.13, abs=1e-6)
    loss.backward()
    # the mined push moves database 11 away from the query (gradient points towards the query)
    assert out.emb_d.grad[1, 1] < 0


def test_mining_unknown_cross_pairs_are_skipped() -> None:
    # two queries, one pair each; (q0, d11) and (q1, d10) are unknown without cross_fov
    emb_q, emb_d = [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.1], [0.0, 0.2]]
    idx = dict(q_idx=torch.tensor([0, 1]), d_idx=torch.tensor([10, 11]))
    out = embedded_batch(emb_q, emb_d, [1.0, 0.0], [1.0, 0.0], **idx)
    fov = known_cross_fov(out)
    assert fov[0, 0] == 1.0 and fov[1, 1] == 0.0 and torch.isnan(fov[0, 1]) and torch.isnan(fov[1, 0])
    base = ContrastiveLoss(0.5)
    # only row 1 has a known negative (its own pair, d = 0.2): 0.5 * 0.3^2 = 0.045, averaged over 1 row
    assert BatchHardContrastive(base)(out).item() == pytest.approx(base(out).item() + 0.045, abs=1e-6)
    # with cross_fov saying d11 is also a negative of q0: row 0 adds 0.045 too; mean stays 0.045
    cross = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    out2 = embedded_batch(emb_q, emb_d, [1.0, 0.0], [1.0, 0.0], cross_fov=cross, **idx)
    assert BatchHardContrastive(base)(out2).item() == pytest.approx(base(out2).item() + 0.045, abs=1e-6)
    # and if it says d11 is a positive of q0, row 1 is the only one again
    cross = torch.tensor([[1.0, 1.0], [float("nan"), 0.0]])
    out3 = embedded_batch(emb_q, emb_d, [1.0, 0.0], [1.0, 0.0], cross_fov=cross, **idx)
    assert BatchHardContrastive(base, k=2)(out3).item() == pytest.approx(base(out3).item() + 0.045, abs=1e-6)


def test_mining_equals_base_without_negatives() -> None:
    base = GradedContrastiveLoss(0.7)
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    # no indices at all: nothing is known
    out = embedded_batch(emb[:3].tolist(), emb[3:].tolist(), [1.0, 0.0, 0.0], [0.9, 0.2, 0.0])
    assert BatchHardContrastive(base)(out).item() == base(out).item()
    # all known pairs positive: no negative to mine
    out = embedded_batch(emb[:3].tolist(), emb[3:].tolist(), [1.0, 1.0, 1.0], [0.9, 0.6, 1.0],
                         q_idx=torch.tensor([0, 0, 1]), d_idx=torch.tensor([3, 4, 5]))
    assert BatchHardContrastive(base)(out).item() == base(out).item()


def test_mining_is_at_least_base_loss() -> None:
    g = torch.Generator().manual_seed(2)
    base = GradedContrastiveLoss(0.7)
    for _ in range(5):
        emb = torch.nn.functional.normalize(torch.randn(32, 8, generator=g), dim=-1)
        fov = torch.rand(16, generator=g) * (torch.rand(16, generator=g) > 0.5)
        cross = torch.rand(16, 16, generator=g)
        out = embedded_batch(emb[:16].tolist(), emb[16:].tolist(), (fov >= 0.5).float().tolist(), fov.tolist(),
                             q_idx=torch.randint(0, 4, (16,), generator=g),
                             d_idx=torch.randint(0, 20, (16,), generator=g), cross_fov=cross)
        for k in (1, 3):
            assert BatchHardContrastive(base, k=k)(out).item() >= base(out).item()


def test_mining_from_config_dict() -> None:
    from hydra.utils import instantiate

    cfg = {
        "_target_": "siamese_retrieval.models.mining.BatchHardContrastive",
        "base_loss": {"_target_": "siamese_retrieval.models.losses.GradedContrastiveLoss", "margin": 0.8},
        "k": 2,
    }
    loss = instantiate(cfg)
    assert isinstance(loss.base_loss, GradedContrastiveLoss) and loss.margin == 0.8 and loss.k == 2
    # the base may also arrive as a plain dict (e.g. `_recursive_=False`)
    loss = BatchHardContrastive(cfg["base_loss"])
    assert isinstance(loss.base_loss, GradedContrastiveLoss)


def test_sum_of_losses_weights_terms_and_detached_head_leaves_embedding_alone() -> None:
    from siamese_retrieval.models.heads import RelevanceHead
    from siamese_retrieval.models.losses import SumOfLosses

    head = RelevanceHead(init_weight=-1.0, init_bias=1.0)
    emb_q = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    emb_d = torch.tensor([[0.0, 0.6], [1.0, 0.2]])
    distance = Distance().pair(emb_q, emb_d)  # [0.6, 0.2]
    logits = head.logits(distance)
    out = PairOutput(emb_q, emb_d, distance, logits, torch.sigmoid(logits), torch.tensor([1.0, 0.0]),
                     torch.tensor([1.0, 0.0]), head_logits_detached=head.logits(distance.detach()))
    loss = SumOfLosses({"embedding": GradedContrastiveLoss(margin=0.5), "head": BCEHeadLoss(detach_distance=True)},
                       weights={"embedding": 1.0, "head": 0.1})
    total = loss(out)
    # embedding: 0.5 * mean(1 * 0.6^2, (1 - 0) * max(0, 0.5 - 0.2)^2) = 0.5 * (0.36 + 0.09) / 2 = 0.1125
    assert loss.last_terms["embedding"].item() == pytest.approx(0.1125, abs=1e-6)
    # head: logits = -d + 1 = [0.4, 0.8]; BCE = mean(log(1 + e^-0.4), log(1 + e^0.8))
    expected_head = (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(0.8))) / 2
    assert loss.last_terms["head"].item() == pytest.approx(expected_head, abs=1e-6)
    assert total.item() == pytest.approx(0.1125 + 0.1 * expected_head, abs=1e-6)
    # the head term reaches the head's parameters but not the embedding
    (grad_q,) = torch.autograd.grad(loss.last_terms["head"], emb_q, retain_graph=True, allow_unused=True)
    assert grad_q is None
    (grad_w,) = torch.autograd.grad(loss.last_terms["head"], head.linear.weight)
    assert grad_w.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss terms"):
        SumOfLosses({"a": MSEHeadLoss()}, weights={"b": 1.0})


def test_sum_of_losses_leaves_out_a_null_term_and_its_weight() -> None:
    """How model=cnn_snn_pairs drops cnn_snn's multi-similarity term: `terms.ms: null`."""
    from siamese_retrieval.models.losses import SumOfLosses

    loss = SumOfLosses({"a": MSEHeadLoss(), "ms": None}, weights={"a": 0.5, "ms": 1.0})
    assert list(loss.terms) == ["a"] and loss.weights == {"a": 0.5}
    with pytest.raises(ValueError, match="at least one loss term"):
        SumOfLosses({"ms": None})
