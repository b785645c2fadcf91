"""Shared fixtures: composed Hydra configs pointing at temporary dirs, and a session-wide data cache."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Nothing a test runs may download (weights, datasets, hub models). Subprocesses inherit these: an HTTP(S)
# client that honours the standard variables (urllib, torch.hub, requests) reaches a closed local port.
DEAD_PROXY = "http://127.0.0.1:9"
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ[_name] = DEAD_PROXY
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "localhost,127.0.0.1,::1"


class NetworkDisabled(OSError):
    """A test tried to reach another machine."""


@pytest.fixture(autouse=True, scope="session")
def no_network() -> Iterator[None]:
    """In the test processes themselves, a connection to anything but this machine is refused (W&B's
    offline service and DDP's rendezvous talk over loopback and stay allowed)."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise NetworkDisabled(f"network disabled in tests: connect to {address!r}")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        yield


def _is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache per test session: the tiny city and its features are built once."""
    return tmp_path_factory.mktemp("data_cache")


def compose_config(config_name: str, overrides: list[str], output_dir: Path, cache_dir: Path):
    """A Hydra config as the entry point would see it, with HydraConfig set (for ${hydra:...})."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A keypoint_snn checkpoint trained for two batches on the tiny city (tests that need any real checkpoint;
    they copy it before changing it)."""
    from siamese_retrieval.train import train

    out = tmp_path_factory.mktemp("tiny_checkpoint")
    cfg = compose_config("train", ["data=synth_tiny", "trainer=cpu", "trainer.max_epochs=1",
                                   "+trainer.limit_train_batches=2", "logger=none"], out, cache_dir)
    return Path(train(cfg)["checkpoint"])
