"""Models: every spec builds, features are the classifier's input, checkpoints load or fail clearly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from effdstl_cli.errors import EffdstlError
from effdstl_cli.models import CIFAR_RESNETS, WRNS, build_model, count_params, load_checkpoint, save_weights

OWN = ["mlp:16", "mlp:256-256", "cnn:small", "cnn:medium", "cnn:large", *CIFAR_RESNETS, *WRNS]


def _x(b=2, c=3, s=32, seed=0):
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def _same_outputs(a, b, x) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("spec", OWN + ["timm:resnet18", "tv:resnet18"])
def test_spec_gives_logits_and_penultimate_features(spec):
    torch.manual_seed(0)
    net = build_model(spec, 7, in_chans=3, image_size=32).eval()
    x = _x()
    with torch.no_grad():
        z = net(x)
        z2, f = net(x, features=True)
        head = net.body.get_submodule(net.head_name)
        assert z.shape == (2, 7) and f.shape == (2, net.feature_dim) and net.feature_dim == head.in_features
        assert torch.allclose(z, z2, atol=1e-5) and torch.allclose(head(f), z, atol=1e-5)
    assert net.spec == spec and net.num_classes == 7 and count_params(net) > 0
    assert not any(k in net.state_dict() for k in ("mean", "std")) and all(k.startswith("body.") for k in net.state_dict())


def test_known_sizes_and_capacity_order():
    # RepDistiller's parameter counts (CIFAR-100 heads): the definitions match theirs
    assert round(count_params(build_model("resnet56", 100)) / 1e6, 2) == 0.86
    assert round(count_params(build_model("resnet32x4", 100)) / 1e6, 2) == 7.43
    assert round(count_params(build_model("wrn_40_2", 100)) / 1e6, 2) == 2.26
    sizes = [count_params(build_model(f"cnn:{s}", 10)) for s in ("small", "medium", "large")]
    assert sizes == sorted(sizes) and sizes[2] > 10 * sizes[0]


def test_normalization_happens_inside_and_grey_input_works():
    torch.manual_seed(0)
    net = build_model("mlp:8", 3, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,)).eval()
    x = _x(4, 1, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), net.body((x - 0.5) / 0.25)) and not torch.allclose(net(x), net.body(x))
    rgb = build_model("resnet20", 10, in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    assert rgb.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert build_model("wrn_16_1", 10, in_chans=1)(_x(2, 1, 28)).shape == (2, 10)  # MNIST-size grey
    with pytest.raises(EffdstlError, match="mean/std have 2/2 values for 3-channel input"):
        build_model("resnet20", 10, mean=(0.1, 0.2), std=(1.0, 1.0))


def test_save_load_round_trip_is_exact_and_atomic(tmp_path):
    torch.manual_seed(0)
    a = build_model("resnet8", 10)
    a.train()(_x(8))  # move BN running stats away from their init
    save_weights(a, tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left behind
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    assert blob["model_spec"] == "resnet8" and blob["num_classes"] == 10
    assert set(blob["model"]) == set(a.body.state_dict())  # plain body keys: loadable anywhere
    torch.manual_seed(1)
    b = build_model("resnet8", 10)
    assert not _same_outputs(a, b, _x())
    load_checkpoint(b, tmp_path / "model.pt")
    assert _same_outputs(a, b, _x())
    c = build_model("resnet8", 10, ckpt=str(tmp_path / "model.pt"))
    assert _same_outputs(a, c, _x())


def test_foreign_state_dict_layouts_load(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=5)
    torch.save(ref.state_dict(), tmp_path / "plain.pt")  # a raw torchvision state_dict
    net = build_model("tv:resnet18", 5)
    load_checkpoint(net, tmp_path / "plain.pt")
    assert _same_outputs(net.body, ref, _x())
    a = build_model("wrn_16_1", 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}, "epoch": 3}, tmp_path / "ddp.pt")
    b = load_checkpoint(build_model("wrn_16_1", 10), tmp_path / "ddp.pt")  # DDP 'module.' + Net 'body.'
    assert _same_outputs(a, b, _x())


# -- checkpoint errors: one clear line ------------------------------------------------------

def _ckpt_err(match, net, path):
    with pytest.raises(EffdstlError, match=match) as e:
        load_checkpoint(net, path)
    assert "\n" not in str(e.value)


def test_bad_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    save_weights(build_model("resnet20", 10), good)
    blob = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 50)
    net = build_model("resnet20", 10)
    _ckpt_err(rf"checkpoint {tmp_path}/missing.pt does not exist", net, tmp_path / "missing.pt")
    for name in ("trunc", "empty", "junk"):
        _ckpt_err(rf"checkpoint {tmp_path}/{name}.pt is corrupt or truncated", net, tmp_path / f"{name}.pt")
    _ckpt_err(r"\(saved from resnet20\) does not fit resnet32: 60 missing keys \(e\.g\. layer1\.3\.conv1\.weight",
              build_model("resnet32", 10), good)
    _ckpt_err(r"does not fit wrn_16_2: \d+ missing keys .*, \d+ unexpected \(e\.g\. layer1\.0\.conv1\.weight",
              build_model("wrn_16_2", 10), good)
    _ckpt_err(r"shape of fc\.weight is \(10, 64\) in the checkpoint but \(100, 64\) in the model; "
              r"it was trained for 10 classes and the model has 100", build_model("resnet20", 100), good)
    torch.save({"model": build_model("resnet20", 10).body.state_dict(), "opt": Path("x")}, tmp_path / "obj.pt")
    _ckpt_err(r"holds Python objects beyond tensors", net, tmp_path / "obj.pt")
    torch.save({"epoch": 3}, tmp_path / "nosd.pt")
    _ckpt_err(r"holds no state_dict", net, tmp_path / "nosd.pt")


# -- names and pretrained weights ------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ("resnet566", r"unknown model 'resnet566' \(did you mean 'resnet56'\?\)"),
    ("timm:resnet188", r"unknown timm model 'resnet188' \(did you mean 'resnet18'\?\)"),
    ("timm:resnet18.a1_in1kk", r"unknown timm weights tag for resnet18 'resnet18.a1_in1kk' \(did you mean 'resnet18.a1_in1k'\?\)"),
    ("tv:resnet188", r"unknown torchvision model 'resnet188' \(did you mean 'resnet18'\?\)"),
    ("cnn:smal", r"unknown cnn size 'smal' \(did you mean 'small'\?\)"),
    ("mlp:a-b", r"bad MLP spec 'mlp:a-b'"),
    ("mlp:", r"bad MLP spec"),
    ("timm:", r"unknown model 'timm:'"),
])
def test_unknown_names_suggest_the_nearest(spec, match):
    with pytest.raises(EffdstlError, match=match):
        build_model(spec, 10)


def test_pretrained_offline_and_uncached_fails_fast_with_the_cure(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm  # noqa: F401  (import time is not the thing measured)

    monkeypatch.setenv("EFFDSTL_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    for spec in ("timm:resnet34d", "tv:resnet34"):
        t = time.time()
        with pytest.raises(EffdstlError, match=rf"pretrained weights for {spec} are not cached and cannot be "
                                               r"downloaded \(offline\?\).*ckpt: PATH"):
            build_model(spec, 10, pretrained=True)
        assert time.time() - t < 5
    with pytest.raises(EffdstlError, match="pretrained: true needs a timm:NAME or tv:NAME"):
        build_model("resnet20", 10, pretrained=True)


def test_pretrained_weights_load_from_local_caches_offline(tmp_path, monkeypatch):
    """A cached file is used without any network: HF cache for timm, torch hub cache for torchvision."""
    import huggingface_hub.constants
    import safetensors.torch
    import timm
    import torchvision
    from timm.models import get_pretrained_cfg

    monkeypatch.setenv("EFFDSTL_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=1000)
    repo = get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    snap = tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    safetensors.torch.save_file(src.state_dict(), str(snap / "model.safetensors"))
    net = build_model("timm:resnet18", 10, pretrained=True)
    assert torch.equal(net.body.conv1.weight, src.conv1.weight) and net.body.fc.out_features == 10

    tv_src = torchvision.models.resnet18()
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv_src.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    tv = build_model("tv:resnet18", 10, pretrained=True)
    assert torch.equal(tv.body.conv1.weight, tv_src.conv1.weight) and tv.body.fc.out_features == 10
    assert tv(_x(), features=True)[1].shape == (2, 512)
