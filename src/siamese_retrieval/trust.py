"""The trust boundary: what a `_target_` read from a file (a checkpoint, a saved config) may name.

Checkpoints and configs come from other people, and Hydra's `instantiate` calls whatever `_target_`
names (`builtins.open`, `os.system`, ...). Everything this package instantiates from data goes
through `checked_instantiate`, which walks the WHOLE tree first and refuses it if any `_target_`
is not one of:
  * the classes listed in `ALLOWED_TARGETS` (this package's encoders, losses, miners, input builders);
  * an optimizer class of `torch.optim` or a scheduler class of `torch.optim.lr_scheduler`
    (checked to be one by type, so `torch.optim.<anything else>` is refused too).
A researcher adding an encoder registers it with `allow_target("my_pkg.MyEncoder")`.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Mapping

from siamese_retrieval.errors import UserError

ALLOWED_TARGETS: set[str] = {
    "siamese_retrieval.models.siamese.SiameseModule",
    "siamese_retrieval.models.keypoint_mlp.KeypointMLP",
    "siamese_retrieval.models.cnn.PlainCNN",
    "siamese_retrieval.models.keypoint_set.KeypointSetEncoder",
    "siamese_retrieval.models.losses.MSEHeadLoss",
    "siamese_retrieval.models.losses.BCEHeadLoss",
    "siamese_retrieval.models.losses.SumOfLosses",
    "siamese_retrieval.models.losses.ContrastiveLoss",
    "siamese_retrieval.models.losses.GradedContrastiveLoss",
    "siamese_retrieval.models.mining.BatchHardContrastive",
    "siamese_retrieval.models.metric_losses.MultiSimilarity",
    "siamese_retrieval.data.inputs.KeypointInputs",
    "siamese_retrieval.data.inputs.ImageInputs",
    "siamese_retrieval.data.inputs.KeypointSetInputs",
    # conf/callbacks/default.yaml; the aggregation heads are chosen by name (PlainCNN(aggregation={name: ...})),
    # never by `_target_`, so they need no entry here
    "siamese_retrieval.models.aggregation_fitting.AggregationFitting",
}

# module -> the base class its targets must subclass (checked after a plain attribute lookup)
_ALLOWED_FAMILIES = {
    "torch.optim": ("torch.optim", "Optimizer"),
    "torch.optim.lr_scheduler": ("torch.optim.lr_scheduler", "LRScheduler"),
}


class UntrustedTargetError(UserError):
    """A `_target_` in a file that this package does not instantiate."""


def allow_target(dotted: str) -> None:
    """Let `checked_instantiate` build `dotted` (a class path) from files, e.g. a researcher's own encoder."""
    ALLOWED_TARGETS.add(str(dotted))


def iter_targets(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every `_target_` anywhere in a nested dict/list tree."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            else:
                yield from iter_targets(value, where)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from iter_targets(value, f"{path}[{i}]")


def is_allowed(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in ALLOWED_TARGETS:
        return True
    module_name, _, attr = target.rpartition(".")
    family = _ALLOWED_FAMILIES.get(module_name)
    if family is None or not attr.isidentifier() or attr.startswith("_"):
        return False
    base = getattr(importlib.import_module(family[0]), family[1])
    candidate = getattr(importlib.import_module(module_name), attr, None)
    return isinstance(candidate, type) and issubclass(candidate, base) and candidate is not base


def check_targets(tree: Any, source: str) -> None:
    """Raise UntrustedTargetError (one line naming `source` and the target) unless every target is allowed."""
    for where, target in iter_targets(tree):
        if not is_allowed(target):
            raise UntrustedTargetError(
                f"{source}: refusing to instantiate {where}={target!r}: not on this package's allowlist "
                f"(siamese_retrieval.trust); a file can only name this package's models, losses and input "
                f"builders and torch.optim optimizers/schedulers"
            )


def checked_instantiate(node: Any, source: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` after `check_targets` over the whole node."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    check_targets(plain, source)
    return instantiate(plain, **kwargs)
