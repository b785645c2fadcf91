"""The one checked way to read a checkpoint and rebuild its model and its input builder.

A checkpoint is self-contained: `hyper_parameters` hold the encoder, loss, optimizer and head configs
and the input builder's config (`inputs`: keypoints or images, their count or size, ORB settings), and
`training_data` records which data, seed and split it was trained on. So `evaluate.py` and `retrieve.py`
need nothing but the file. Reading it is the trust boundary (docs/extending.md): it is loaded with
`weights_only=True`, every `_target_` anywhere in it is checked (trust.py: registered components, or the
classes the user names with `trust.allow=[...]`) before anything is built, and every fault is one `UserError`
naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from siamese_retrieval.errors import UserError, first_line, load_failure
from siamese_retrieval.models.siamese import SiameseModule
from siamese_retrieval.trust import allow_list, check_targets, checked_instantiate


@dataclass
class LoadedCheckpoint:
    path: Path
    module: SiameseModule  # in eval mode, on the requested device
    inputs_cfg: dict[str, Any]  # the input builder's config, `_target_` included (checked)
    training_data: dict[str, Any]  # {"name", "seed", "split"} of the training run ({} when unknown)
    trust_allow: tuple[str, ...] = ()  # the user's trust.allow, for what is built from the file later

    @property
    def model_name(self) -> str:
        return str(self.module.hparams.get("model_name", "?"))

    def build_inputs(self) -> Any:
        """The input builder the model was trained with (data/inputs.py)."""
        return checked_instantiate(self.inputs_cfg, f"checkpoint {self.path}: inputs", self.trust_allow)


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line: Hydra wraps a builder's error in `Error in call to target ...:`, whose
    own first line says nothing (a registry name this process does not know says `imports=[...]` itself)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)


def read_checkpoint(path: str | Path, allow: tuple[str, ...] | list[str] = (),
                    also: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The raw checkpoint dict, checked: a torch file, a SiameseModule checkpoint, only allowed targets
    (`allow`: the user's trust.allow; `also`: what the caller trusts besides, e.g. a resumed run's own classes)."""
    path = Path(path)
    if path.is_dir():  # a run directory, most likely: name the checkpoints it holds
        held = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt"))
        hint = f" (its checkpoints/ holds {', '.join(held)})" if held else ""
        raise UserError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip/pickle/unpickler errors have no common base class
        raise UserError(f"checkpoint {path} is not a loadable torch checkpoint ({load_failure(exc)})") from None
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or "state_dict" not in raw or not isinstance(hparams, dict) or "encoder" not in hparams:
        raise UserError(f"checkpoint {path} is not a SiameseModule checkpoint (no hyper_parameters.encoder / state_dict)")
    check_targets(hparams, f"checkpoint {path}", allow, also)  # the whole tree, before anything is built
    return raw


def weights_mismatch(saved: dict[str, Any], own: dict[str, Any]) -> str | None:
    """Why `saved` weights do not load into a model whose state is `own` (names, then shapes); None if they do."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]} (another code version or model config)"
    for key, value in own.items():
        shape = tuple(getattr(saved[key], "shape", ()))
        if shape != tuple(value.shape):
            return f"{key} has shape {shape}, the model {tuple(value.shape)} (another model config)"
    return None


def check_resumable(raw: dict[str, Any], path: str | Path, module: torch.nn.Module, model_name: str) -> None:
    """A checkpoint to resume `module` from must hold the same model with the same weights' names and shapes."""
    found = raw["hyper_parameters"].get("model_name", "?")
    if found != model_name:
        raise UserError(f"ckpt_path: checkpoint {path} holds model_name={found!r}, but this run trains {model_name!r}")
    problem = weights_mismatch(raw["state_dict"], module.state_dict())
    if problem:
        raise UserError(f"ckpt_path: checkpoint {path} does not fit this model: {problem}")


def load_checkpoint(path: str | Path, expected_model: str | None = None,
                    map_location: str | torch.device = "cpu", allow: tuple[str, ...] | list[str] = ()) -> LoadedCheckpoint:
    """The checkpoint's model (eval mode) and input config; `expected_model` must match its `model_name`;
    `allow`: the classes the user trusts beyond the registered ones (trust.allow)."""
    path = Path(path).expanduser()
    allow = tuple(allow)
    raw = read_checkpoint(path, allow)
    hparams = raw["hyper_parameters"]
    found = hparams.get("model_name", "?")
    if expected_model is not None and found != expected_model:
        raise UserError(f"checkpoint {path} holds model_name={found!r}, expected {expected_model!r}")
    inputs_cfg = hparams.get("inputs")
    if not isinstance(inputs_cfg, dict) or "_target_" not in inputs_cfg:
        raise UserError(f"checkpoint {path} has no input builder config (hyper_parameters.inputs): it was made by "
                        f"an older siamese-retrieval; retrain it with this version")
    try:  # built from the dict whose targets were checked: the file is read once, never re-read after the check
        module = SiameseModule(**hparams)
        problem = weights_mismatch(raw["state_dict"], module.state_dict())
        if problem is None:
            module.load_state_dict(raw["state_dict"])
    except UserError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - hparams or weights that no longer fit this code
        problem = _root_cause(exc)
    if problem:
        raise UserError(f"checkpoint {path} (model_name={found!r}) does not fit this code: {problem}")
    training = raw.get("training_data")
    return LoadedCheckpoint(path, module.to(map_location).eval(), inputs_cfg,
                            training if isinstance(training, dict) else {}, allow)


def load_from_config(cfg: Any) -> LoadedCheckpoint:
    """`ckpt_path=` of an evaluate/retrieve config; `model=NAME` (a conf/model entry), when given, must be
    the model the checkpoint holds; `device=` auto | cpu | cuda."""
    if cfg.get("ckpt_path") in (None, ""):
        raise UserError("ckpt_path: no checkpoint given (ckpt_path=PATH/TO.ckpt)")
    model = cfg.get("model")
    expected = str(model.name) if model is not None and model.get("name") else None
    return load_checkpoint(str(cfg.ckpt_path), expected, map_location=resolve_device(str(cfg.get("device", "auto"))),
                           allow=allow_list(cfg))


def resolve_device(device: str = "auto") -> str:
    """`auto` -> cuda when available, else cpu; `cuda` on a machine without one is the user's one-line error,
    not a traceback from deep inside the first tensor moved there."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: this machine has no CUDA GPU (torch.cuda.is_available() is false); "
                        "use device=auto or device=cpu")
    return device
