"""model=backbone_snn (models/backbone.py): torchvision's ResNets by name and size, weights from local files in
every form people save them (nested, prefixed, safetensors), one line for a file that does not fit, truncation,
frozen stages, and a checkpoint that never needs the weights file again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from siamese_retrieval.errors import UserError
from siamese_retrieval.models.backbone import BackboneEncoder, ResNet, read_weights
from tests.conftest import ROOT

# torchvision's published sizes (torchvision.models.resnetN().state_dict() / .parameters(), classifier included)
TORCHVISION = {"resnet18": (122, 11_689_512), "resnet34": (218, 21_797_672), "resnet50": (320, 25_557_032)}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_the_architectures_are_torchvisions(name: str) -> None:
    full = ResNet(name, stages=4, classifier=True)
    n_tensors, n_params = TORCHVISION[name]
    assert len(full.state_dict()) == n_tensors
    assert sum(p.numel() for p in full.parameters()) == n_params
    keys = list(full.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    # the first block of stage 1 needs a projection shortcut only where it widens (bottleneck: 64 -> 256)
    assert "layer2.0.downsample.0.weight" in keys
    assert ("layer1.0.downsample.0.weight" in keys) == (name == "resnet50")


def torchvision_like_file(tmp_path: Path, name: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A full state dict as torchvision would save it (random init: a real weights file of that layout)."""
    torch.manual_seed(seed)
    state = ResNet(name, stages=4, classifier=True).state_dict()
    for k, v in state.items():  # every tensor distinct from a fresh init, BatchNorm statistics included
        if v.is_floating_point():
            state[k] = v + torch.randn_like(v) * 0.01
    return state


@pytest.mark.parametrize("form", ["pth", "nested_state_dict", "nested_model_module_prefix", "backbone_prefix",
                                  "bin", "safetensors"])
def test_loaded_parameters_equal_the_files_tensors(form: str, tmp_path: Path) -> None:
    state = torchvision_like_file(tmp_path)
    path = tmp_path / ("w." + {"bin": "bin", "safetensors": "safetensors"}.get(form, "pth"))
    if form == "nested_state_dict":
        torch.save({"state_dict": state, "epoch": 7}, path)
    elif form == "nested_model_module_prefix":
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    elif form == "backbone_prefix":
        torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    elif form == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    enc = BackboneEncoder("resnet18", weights=str(path), stages=3)
    loaded = enc.features.state_dict()
    assert "layer4.0.conv1.weight" not in loaded  # cut after the 3rd stage
    for k, v in loaded.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_a_file_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_like_file(tmp_path, "resnet50"), path)
    with pytest.raises(UserError) as err:
        BackboneEncoder("resnet18", weights=str(path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.weights={path}: does not fit resnet18")
    assert "unexpected (layer1.0.bn3.bias, layer1.0.bn3.num_batches_tracked, layer1.0.bn3.running_mean, ...)" in msg
    assert "of another shape (layer1.0.conv1.weight, " in msg
    partial = {k: v for k, v in torchvision_like_file(tmp_path).items() if not k.startswith("layer3.")}
    torch.save(partial, tmp_path / "partial.pth")
    # layer3 of resnet18: 2 blocks x (2 convs + 2 BatchNorms of 5) + the shortcut (conv + BatchNorm) = 30 tensors,
    # of which the 5 num_batches_tracked counters are optional (older files lack them): 25 missing of 90 kept
    with pytest.raises(UserError, match=r"does not fit resnet18 \(90 tensors kept\): 25 missing \(layer3\.0\.bn1"):
        BackboneEncoder("resnet18", weights=str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"junk.pth: not a readable weights file \(the weights-only loader refused "
                                        r"it: Unsupported operand \d+\)$"):  # not torch's advice to load it unsafely
        read_weights(tmp_path / "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match="holds no tensors"):
        read_weights(tmp_path / "empty.pth")


def test_a_pickled_object_in_a_weights_file_is_refused_not_run(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    torch.save({"state_dict": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="evil.pth: not a readable weights file"):
        read_weights(tmp_path / "evil.pth")


def test_frozen_stages_keep_their_weights_and_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = BackboneEncoder("resnet18", stages=3, freeze_stages=2, embedding_dim=16).train()
    frozen = {k: v.clone() for k, v in enc.features.state_dict().items() if k.startswith(("conv1", "bn1", "layer1"))}
    assert frozen and all(not p.requires_grad for n, p in enc.features.named_parameters()
                          if n.startswith(("conv1", "bn1", "layer1")))
    assert all(p.requires_grad for n, p in enc.features.named_parameters() if n.startswith(("layer2", "layer3")))
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.1)
    batch = {"image": torch.randint(0, 256, (4, 3, 64, 96), dtype=torch.uint8)}
    out = enc(batch)
    assert out.shape == (4, 16)
    out.sum().backward()
    opt.step()
    enc(batch)  # a second training-mode pass: frozen BatchNorm statistics must not move
    for k, v in frozen.items():
        torch.testing.assert_close(enc.features.state_dict()[k], v, rtol=0, atol=0)
    assert not torch.equal(enc.features.layer2[0].conv1.weight, ResNet("resnet18", 3).layer2[0].conv1.weight)


@pytest.mark.parametrize("aggregation", ["gem", "netvlad", {"name": "mixvpr", "channels": 32, "pool": [2, 2]}])
def test_any_head_on_top(aggregation) -> None:
    enc = BackboneEncoder("resnet18", stages=3, embedding_dim=24, aggregation=aggregation).eval()
    with torch.no_grad():
        y = enc({"image": torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)})
    assert y.shape == (2, 24) and torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_train_one_epoch_from_a_weights_file_on_gsv_cities_then_evaluate_without_it(cache_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """Issue 25's acceptance run: the synthetic city converted to the GSV-Cities layout trains one epoch of
    model=backbone_snn model.backbone=resnet18 model.weights=<a saved state dict> data=gsv_cities; the checkpoint
    then evaluates after the weights file is gone (its tensors are the trained weights)."""
    from siamese_retrieval.data.convert import main as convert_main
    from siamese_retrieval.data.synth import SynthConfig, ensure_city

    city = ensure_city(cache_dir, SynthConfig.from_preset("tiny"))
    gsv = tmp_path / "gsv"
    assert convert_main(["--layout", "contract", "--root", str(city), "--out", str(gsv), "--to", "gsv_cities"]) == 0
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision_like_file(tmp_path), weights)
    run = tmp_path / "run"
    env_free = [f"paths.cache_dir={cache_dir}", "logger=none"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=backbone_snn", "model.backbone=resnet18",
                           f"model.weights={weights}", "data=gsv_cities", f"data.root={gsv}", "trainer.max_epochs=1",
                           "model.inputs.height=64", "model.inputs.width=96", f"hydra.run.dir={run}", *env_free],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = json.loads((run / "metrics.json").read_text())["checkpoint"]
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["encoder"]["weights"] is None and hparams["encoder"]["backbone"] == "resnet18"
    weights.unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}", "data=synth_tiny",
                           f"hydra.run.dir={tmp_path / 'e'}", *env_free], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


class _FakeTimm:
    """timm's contract as the adapter uses it (timm itself cannot be installed beside this machine's torch):
    create_model(name, pretrained, features_only, out_indices, pretrained_cfg_overlay) -> a features model with
    feature_info.channels(); a file overlay is loaded by timm (here: torch.load), never a download. `calls`
    records what the adapter asked for."""

    calls: list[dict] = []

    @classmethod
    def create_model(cls, name: str, pretrained: bool = False, features_only: bool = False, out_indices=(0,),
                     pretrained_cfg_overlay: dict | None = None):
        cls.calls.append({"name": name, "pretrained": pretrained, "overlay": pretrained_cfg_overlay})
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        torch.manual_seed(0)
        widths = (8, 16, 32)

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stages = torch.nn.ModuleList(torch.nn.Conv2d(3 if i == 0 else widths[i - 1], w, 3, 2, 1)
                                                  for i, w in enumerate(widths))

            def forward(self, x):
                outs = []
                for stage in self.stages:
                    x = stage(x)
                    outs.append(x)
                return [outs[i] for i in out_indices]

        net = Net()
        net.feature_info = type("Info", (), {"channels": staticmethod(lambda: [widths[i] for i in out_indices])})()
        if pretrained:
            assert pretrained_cfg_overlay and "file" in pretrained_cfg_overlay, "a download was asked for"
            net.load_state_dict(torch.load(pretrained_cfg_overlay["file"], weights_only=True))  # raises on misfit
        return net


def test_a_timm_backbone_through_its_adapter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "timm", _FakeTimm)
    _FakeTimm.calls.clear()
    enc = BackboneEncoder("timm:tiny", stages=2, embedding_dim=8).eval()
    assert enc.features.out_channels == 16 and _FakeTimm.calls[-1] == {"name": "tiny", "pretrained": False,
                                                                         "overlay": None}
    with torch.no_grad():
        assert enc({"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)}).shape == (2, 8)
    state = {k: v + 1.0 for k, v in enc.features.model.state_dict().items()}
    torch.save(state, tmp_path / "t.pth")
    enc = BackboneEncoder("timm:tiny", weights=str(tmp_path / "t.pth"), stages=2)
    assert _FakeTimm.calls[-1]["overlay"] == {"file": str(tmp_path / "t.pth")}  # timm's loader, the local file
    torch.testing.assert_close(enc.features.model.stages[1].weight, state["stages.1.weight"], rtol=0, atol=0)
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"model.backbone=timm:tiny model.weights=.*bad.pth: Error\(s\) in loading"):
        BackboneEncoder("timm:tiny", weights=str(tmp_path / "bad.pth"), stages=2)
    with pytest.raises(UserError, match=r"model.backbone=timm:nope: Unknown model \(nope\)"):
        BackboneEncoder("timm:nope")
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed: one line saying how to get it
    with pytest.raises(UserError, match=r"model.backbone=timm:tiny needs timm, an optional extra"):
        BackboneEncoder("timm:tiny")
