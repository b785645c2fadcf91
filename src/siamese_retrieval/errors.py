"""Errors that end a run with one clear line instead of a traceback."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn


class UserError(Exception):
    """A problem with the user's input (dataset, config, path); the message says what and where."""


class DatasetError(UserError):
    """A dataset root that does not satisfy the on-disk contract."""


class ConfigError(UserError):
    """A configuration value that cannot work (empty split, impossible pair recipe, ...)."""


class UnknownComponent(ConfigError):
    """A name that no registry of this process holds: a typo, or a component of the user's module that was not
    imported; its message (registry.unknown_component) says `imports=[...]` wherever it is raised."""


def fail(message: str) -> NoReturn:
    """End the process as every refusal does: `error: <message>` on stderr, exit code 2 (here, importable before
    torch, so that Hydra callbacks and entry points share one wording)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------- wording a value read from a file
def one_line(text: object) -> str:
    """An exception's text or a user's value squeezed onto one line (error messages are one line)."""
    return " ".join(str(text).split())


def first_line(exc: BaseException) -> str:
    """What a one-line refusal quotes of an exception: its first line (its class name when it has no text)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_failure(exc: BaseException) -> str:
    """Why `torch.load(weights_only=True)` could not read a file, on one line. For the weights-only unpickler's
    refusal, its own reason (`Unsupported operand 103`: no torch save; `Unsupported global: ...`: a pickle that
    names code), never torch's advice to load the file again without weights_only, which would run that code."""
    text = str(exc).strip()
    marker = "WeightsUnpickler error:"
    if "Weights only load failed" in text and marker in text:
        reason = one_line(text.split(marker, 1)[1].split("Check the documentation", 1)[0])
        return f"the weights-only loader refused it: {reason[:200]}"
    return first_line(exc).split(". ", 1)[0]  # torch's first sentence; the rest is advice


def json_snippet(value: object, limit: int = 60) -> str:
    """A value read from a JSON file, written as JSON (escaped: one line), cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_kind(value: object) -> str:
    """The JSON name of a parsed value's type, with its article (for messages about a file's content)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------- building what the user configured
# A TypeError raised while binding a constructor's arguments (a keyword it does not take, a missing one): the
# config's fault, not the constructor's. Python's own wording (3.8 - 3.13).
_BINDING_ERROR = re.compile(
    r"got an unexpected keyword argument|missing \d+ required (positional|keyword-only) arguments?"
    r"|takes (from \d+ to )?\d+ positional arguments? but \d+ (was|were) given|got multiple values for argument"
    r"|got some positional-only arguments passed as keyword arguments|takes no (keyword )?arguments")


def instantiate_config(key: str, node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, *args, **kwargs)` of the user's config node `key` (`trainer`,
    `callbacks.model_checkpoint`, `model.module`, ...). What the config cannot build is one ConfigError naming the
    node, the target and the reason (`instantiation_error`); anything else raised inside a constructor (a bug)
    keeps its traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        error = instantiation_error(key, exc, node)
        if error is None:
            raise
        raise error from None


def instantiate_partial(key: str, node: Any, *args: Any) -> Any:
    """`instantiate_config(key, node, _partial_=True)(*args)`: the optimizer / scheduler nodes, whose keywords
    meet the class only at this call; its refusal of them is the same one ConfigError."""
    factory = instantiate_config(key, node, _partial_=True)
    try:
        return factory(*args)
    except Exception as exc:
        if isinstance(exc, UserError) or not _refused_by_constructor(exc):
            raise
        raise ConfigError(f"{key}: cannot build {_written_target(node) or '?'}: {_reason(exc)}") from None


def instantiation_error(key: str, exc: BaseException, node: Any = None) -> UserError | None:
    """The UserError of a Hydra InstantiationException that the config caused, else None (a crash to show).

    The config's fault: a `_target_` that does not import or is not callable, a keyword the constructor does
    not take (or a missing one), a value the constructor refuses (ValueError, an ImportError of an optional
    requirement, Lightning's MisconfigurationException), a UserError raised by the constructor (as it is).
    A nested instantiation (a module that instantiates its encoder) is judged by the innermost one, and named
    by the part of `node` (the config that was instantiated) with that `_target_` when there is one. Targets are
    named as the config writes them (Hydra's message names the class where it is defined).

        trainer: cannot build pytorch_lightning.Trainer: Trainer.__init__() got an unexpected keyword argument 'x'
    """
    from hydra.errors import InstantiationException

    cause = exc.__cause__
    if isinstance(cause, InstantiationException):  # e.g. SiameseModule building its encoder from model.module.encoder
        inner = _quoted_target(str(cause).splitlines()[0] if str(cause) else "")
        where, inner_node = _find_target(node, inner) or (None, None)
        return instantiation_error(f"{key}.{where}" if where else key, cause, inner_node)
    if isinstance(cause, UserError):
        return cause
    message = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("full_key:")]
    head = message[0] if message else ""
    target = _written_target(node) or _quoted_target(head)
    if cause is None:  # Hydra's own refusal (a target that is not callable, a bad _partial_ flag)
        return ConfigError(f"{key}: {'; '.join(m.rstrip('.') for m in message) or type(exc).__name__}")
    if head.startswith("Error locating target"):
        root = cause
        while root.__cause__ is not None:
            root = root.__cause__
        return ConfigError(f"{key}: cannot build {target}: {_reason(root)}")
    if _refused_by_constructor(cause):
        return ConfigError(f"{key}: cannot build {target}: {_reason(cause)}")
    return None


def _refused_by_constructor(exc: BaseException) -> bool:
    if isinstance(exc, TypeError):
        return bool(_BINDING_ERROR.search(str(exc)))
    if isinstance(exc, (ValueError, ImportError)):
        return True
    return any(cls.__name__ == "MisconfigurationException" for cls in type(exc).__mro__)  # Lightning's


def _reason(exc: BaseException) -> str:
    """The exception's message in one line; its type first where the message alone would not say what."""
    text = one_line(exc)
    if isinstance(exc, (ImportError, TypeError, ValueError)) or type(exc).__name__ == "MisconfigurationException":
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _quoted_target(line: str) -> str:
    """The target Hydra names in its message: `Error in call to target 'a.B':` / `Error locating target 'a.B'`
    / `Error in creating partial(a.B, ...) object:`."""
    match = re.search(r"target '([^']+)'|partial\(([^,)]+)", line)
    return next((g for g in match.groups() if g), "?") if match else "?"


def _plain(node: Any) -> Any:
    """A config node as plain Python (unresolvable parts left as they are); anything else as it is."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=False)
    except Exception:  # noqa: BLE001 - only used to word a message
        return None
    return node


def _written_target(node: Any) -> str | None:
    target = _plain(node).get("_target_") if isinstance(_plain(node), dict) else None
    return target if isinstance(target, str) else None


def _find_target(node: Any, target: str) -> tuple[str, Any] | None:
    """The dotted path below `node`, and the mapping itself (plain Python), of the one mapping whose `_target_`
    is `target`; None when not exactly one."""
    found: list[tuple[str, Any]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            if path and value.get("_target_") == target:
                found.append((path, value))
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))

    walk(_plain(node), "")
    return found[0] if len(found) == 1 else None
