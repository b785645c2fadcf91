"""The trust boundary: what a `_target_` read from a FILE (a checkpoint, a saved config, a cache) may name.

Hydra's `instantiate` calls whatever `_target_` names (`builtins.open`, `os.system`, ...). A config the user
composes (the package's conf/, `--config-dir`, the command line) is theirs: it is instantiated as Hydra does.
What is read from a file is data, and before anything in it is built the WHOLE tree is checked
(`check_targets`): every `_target_` must be
  * a component registered in one of the registries (registry.py: this package's encoders, losses, miners,
    input builders, ...; a researcher's own component once its module has registered it), or
  * an optimizer class of `torch.optim` or a scheduler class of `torch.optim.lr_scheduler`, or
  * a class the user names on the command line: `trust.allow=[my_pkg.encoders.TinyEncoder]`.
Only classes can be allowed: functions, builtins and the classes of modules that reach the operating system
(os, subprocess, shutil, ...) are refused whatever the list says. A refusal is one line that names the target
and the file and gives the override that would accept it.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Iterator, Mapping

from siamese_retrieval.errors import UserError
from siamese_retrieval.registry import registered_target

# module -> the base class its targets must subclass (checked after a plain attribute lookup)
_ALLOWED_FAMILIES = {
    "torch.optim": ("torch.optim", "Optimizer"),
    "torch.optim.lr_scheduler": ("torch.optim.lr_scheduler", "LRScheduler"),
}
# Never allowed, even by name: their classes open files, run programs or load code.
_NEVER_MODULES = ("builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "pathlib", "io", "socket",
                  "importlib", "pickle", "marshal", "runpy", "code", "ctypes", "pty", "multiprocessing", "tempfile",
                  "webbrowser", "urllib", "http", "ftplib", "smtplib", "signal", "threading", "asyncio")


class UntrustedTargetError(UserError):
    """A `_target_` in a file that this package does not instantiate."""


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


def _is_dotted(target: Any) -> bool:
    return isinstance(target, str) and all(part.isidentifier() for part in target.split("."))


def _never(target: str) -> bool:
    root = target.split(".", 1)[0]
    return root in _NEVER_MODULES or any(not part or part.startswith("__") for part in target.split("."))


def _nameable(target: Any) -> bool:
    """A dotted path outside the modules that are never built: a target that could be allowed by name."""
    return _is_dotted(target) and not _never(target)


def user_class(target: str) -> type | None:
    """The class a user allowed by name (`trust.allow`), or None when it is not a class or may never be built.

    Importing its module is what the user asked for by naming it."""
    if not _nameable(target):
        return None
    module_name, _, attr = target.rpartition(".")
    try:
        candidate = getattr(importlib.import_module(module_name), attr, None)
    except Exception:  # noqa: BLE001 - a module that does not import cannot provide the class
        return None
    if not isinstance(candidate, type) or _never(f"{candidate.__module__}.{candidate.__qualname__}"):
        return None
    return candidate


def is_allowed(target: Any, allow: Iterable[str] = ()) -> bool:
    """Whether a `_target_` read from a file may be instantiated (see the module docstring)."""
    if not _nameable(target):
        return False
    if registered_target(target) is not None:
        return True
    module_name, _, attr = target.rpartition(".")
    family = _ALLOWED_FAMILIES.get(module_name)
    if family is not None and not attr.startswith("_"):
        base = getattr(importlib.import_module(family[0]), family[1])
        candidate = getattr(importlib.import_module(module_name), attr, None)
        return isinstance(candidate, type) and issubclass(candidate, base) and candidate is not base
    return target in set(allow) and user_class(target) is not None


def check_targets(tree: Any, source: str, allow: Iterable[str] = (), also: Iterable[str] = ()) -> None:
    """Raise UntrustedTargetError (one line naming `source`, the target and the override that would accept it)
    unless every `_target_` in `tree` is allowed; `allow` is the user's `trust.allow` list (the hint extends it),
    `also` what the caller trusts besides (a resumed run's own model classes: never shown in the hint)."""
    allow = list(allow)
    trusted = [*allow, *also]
    for where, target in iter_targets(tree):
        if is_allowed(target, trusted):
            continue
        if _nameable(target) and target not in allow:
            hint = f"if you trust that class, add trust.allow=[{','.join([*allow, target])}]"
        else:
            hint = "only classes can be allowed, never functions, builtins or operating-system modules"
        raise UntrustedTargetError(f"{source}: refusing to instantiate {where}={target!r}: it is not a registered "
                                   f"component of this package; {hint}")


def allow_list(cfg: Any) -> list[str]:
    """The user's `trust.allow` (a list of class paths) from a composed config; [] when absent."""
    trust = cfg.get("trust") if hasattr(cfg, "get") else None
    allowed = trust.get("allow") if trust is not None else None
    if allowed is None:
        return []
    if isinstance(allowed, str):
        allowed = [allowed]
    bad = [a for a in allowed if not _is_dotted(a)]
    if bad:
        raise UserError(f"trust.allow={list(allowed)}: {bad[0]!r} is not a dotted class path such as "
                        f"my_package.module.MyClass")
    return [str(a) for a in allowed]


def checked_instantiate(node: Any, source: str, allow: Iterable[str] = (), **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` of a node read from a file, after `check_targets` over all of it."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    check_targets(plain, source, allow)
    return instantiate(plain, **kwargs)
