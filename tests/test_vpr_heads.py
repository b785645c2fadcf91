"""MixVPR, BoQ and SALAD (models/vpr_heads.py): sizes, unit norm, gradients to every parameter, determinism,
the Sinkhorn plan's marginals, and the heads through PlainCNN, the config node and a checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch

from siamese_retrieval.errors import ConfigError
from siamese_retrieval.models.aggregation import aggregation_config
from siamese_retrieval.models.cnn import PlainCNN
from siamese_retrieval.models.vpr_heads import BoQ, MixVPR, SALAD, sinkhorn_log
from siamese_retrieval.registry import AGGREGATIONS

SMALL = {  # small sizes for speed; the papers' sizes are conf/ablation/{mixvpr,boq,salad}.yaml
    "mixvpr": lambda c: MixVPR(c, channels=16, rows=3, depth=2, mlp_ratio=2.0, pool=(2, 3)),
    "boq": lambda c: BoQ(c, channels=32, queries=5, layers=2, rows=4),
    "salad": lambda c: SALAD(c, clusters=6, cluster_dim=8, token_dim=10, hidden=16),
}
OUT_DIM = {"mixvpr": 16 * 3, "boq": 32 * 4, "salad": 10 + 6 * 8}


def test_the_heads_are_registered_choices() -> None:
    assert {"mixvpr", "boq", "salad"} <= set(AGGREGATIONS.names())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_size_unit_norm_and_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    head = SMALL[name](24)
    x = torch.randn(3, 24, 5, 7, requires_grad=True)
    y = head(x)
    assert y.shape == (3, OUT_DIM[name]) == (3, head.out_dim)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_and_each_image_alone(name: str) -> None:
    """The same seed builds the same head; in eval mode an image's vector does not depend on its batch."""
    x = torch.randn(4, 24, 4, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    a = SMALL[name](24).eval()
    torch.manual_seed(3)
    b = SMALL[name](24).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        torch.testing.assert_close(a(x[1:2]), a(x)[1:2], rtol=1e-5, atol=1e-6)


def test_sinkhorn_converges_to_the_marginals() -> None:
    """Many iterations: the plan's rows sum to a, its columns to b (a known answer for any scores)."""
    scores = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([0.1, 0.2, 0.3, 0.4]) * 7 / 10  # rows and columns carry the same total mass (0.7)
    b = torch.full((7,), 0.1)
    plan = sinkhorn_log(scores, a.log(), b.log(), iters=200).exp()
    torch.testing.assert_close(plan.sum(dim=2), a.expand(2, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(dim=1), b.expand(2, -1), atol=1e-5, rtol=0)


def test_salad_plan_and_dust_bin() -> None:
    """Known answers of SALAD's plan (3 iterations, as in the head): with equal scores every cluster holds
    1/(n+m) spread evenly over the n positions and the dust bin the rest, (n-m)/(n+m); a position that only
    cluster 0 scores high takes most of cluster 0's mass. With fewer positions than clusters the head stays
    finite."""
    n, m = 9, 3
    log_a = torch.full((m + 1,), -math.log(n + m))
    log_a[-1] += math.log(n - m)
    log_b = torch.full((n,), -math.log(n + m))
    plan = sinkhorn_log(torch.zeros(1, m + 1, n), log_a, log_b, iters=3).exp()[0]
    torch.testing.assert_close(plan[:m], torch.full((m, n), 1 / (n + m) / n))
    torch.testing.assert_close(plan[m].sum(), torch.tensor((n - m) / (n + m)))
    scores = torch.zeros(1, m + 1, n)
    scores[0, 0, 4] = 8.0
    plan = sinkhorn_log(scores, log_a, log_b, iters=3).exp()[0]
    assert plan[0, 4] > 0.9 * plan[0].sum() and plan[1:m, 4].sum() < 0.1 * plan[0, 4]
    torch.manual_seed(0)
    head = SALAD(8, clusters=3, cluster_dim=4, token_dim=2, hidden=8, dropout=0.0).eval()
    with torch.no_grad():
        assert torch.isfinite(head(torch.randn(2, 8, 1, 2))).all()  # 2 positions < 3 clusters


@pytest.mark.parametrize("name", ["mixvpr", "boq", "salad"])
def test_on_the_plain_cnn_through_the_config_node_and_a_state_dict(name: str) -> None:
    knobs = {"name": name, "channels": 32, "rows": 2, "depth": 1, "queries": 4, "layers": 1, "clusters": 4,
             "cluster_dim": 8, "token_dim": 8, "pool": [2, 2]}
    assert aggregation_config(knobs)["name"] == name
    torch.manual_seed(0)
    model = PlainCNN(widths=(8, 16), embedding_dim=12, aggregation=knobs).eval()
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)}
    with torch.no_grad():
        y = model(batch)
    assert y.shape == (2, 12)
    torch.manual_seed(5)
    again = PlainCNN(widths=(8, 16), embedding_dim=12, aggregation=knobs).eval()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(batch), y, rtol=0, atol=0)


@pytest.mark.parametrize("knob,value", [("rows", 0), ("depth", -1), ("queries", 1.5), ("mlp_ratio", 0),
                                        ("token_dim", True)])
def test_bad_knobs_name_the_knob(knob: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"aggregation.{knob}=[^:]+: must be "):
        aggregation_config({"name": "mixvpr", knob: value})
