"""Networks by spec, wrapped so they take pixel-space input and can return penultimate features.

Specs: ``mlp:H1-H2-...``, ``cnn:small|medium|large``, the CIFAR ResNets/WRNs of RepDistiller/CRD
(``resnet8..resnet110``, ``resnet8x4``, ``resnet32x4``, ``wrn_16_1/16_2/40_1/40_2``; same module
names, so their released teacher checkpoints load), ``timm:NAME`` and ``tv:NAME``.

``Net`` normalizes (mean/std buffers, not saved) and calls its ``body``; a body's state_dict is
the plain timm/torchvision/RepDistiller one, so ``load_checkpoint`` loads foreign weights as-is.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .network import online
from .errors import EffdstlError, unknown

from .modelspec import CIFAR_RESNETS, CNNS, MODELS, WRNS, check_model_spec  # noqa: F401 - torch-free; re-exported


# -- small bodies: forward_features(x) -> (B, D), fc: the classifier ----------------------------

class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int], num_classes: int):
        super().__init__()
        layers, d = [nn.Flatten()], in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.fc(self.features(x))


class PlainCNN(nn.Module):
    """Three conv-BN-ReLU stages (max-pooled between), global average pool: any input >= 4 px."""

    def __init__(self, in_chans: int, widths: tuple[int, ...], convs_per_stage: int, num_classes: int):
        super().__init__()
        layers, c = [], in_chans
        for s, w in enumerate(widths):
            if s:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.fc(self.features(x))


def _he_init(net: nn.Module, zero_linear_bias: bool = False) -> None:
    """The CIFAR ResNet/WRN init: He-normal convolutions (fan out), BatchNorm at 1 and 0, in module
    order (so the random draws, hence every run's init, are those of the reference code)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block of the CIFAR ResNets (1x1 conv + BN shortcut on a change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet: 3x3 stem, no max-pool, three stages of (depth-2)/6 blocks."""

    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int, in_chans: int = 3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1, self.relu = _conv3(in_chans, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        stages, c = [], widths[0]
        for s, w in enumerate(widths[1:]):
            blocks = [BasicBlock(c, w, 1 if s == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(8) at 32 px, and works at any size
        self.fc = nn.Linear(c, num_classes)
        _he_init(self)

    def forward_features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.avgpool(self.layer3(self.layer2(self.layer1(x)))).flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


class WideBlock(nn.Module):
    """Pre-activation WRN block; on a width change the shortcut (1x1 conv) takes the activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = _conv3(cin, cout, stride)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = _conv3(cout, cout)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))


class _Stage(nn.Module):  # keeps RepDistiller's key names: blockN.layer.K.*
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if k == 0 else cout, cout, stride if k == 0 else 1)
                                     for k in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_chans: int = 3):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3(in_chans, w[0])
        self.block1, self.block2, self.block3 = _Stage(n, w[0], w[1], 1), _Stage(n, w[1], w[2], 2), _Stage(n, w[2], w[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(w[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(w[3], num_classes)
        _he_init(self, zero_linear_bias=True)

    def forward_features(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x)).mean((2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


# -- the wrapper ----------------------------------------------------------------------------

class Net(nn.Module):
    """``net(x)`` -> logits; ``net(x, features=True)`` -> (logits, penultimate features (B, D)).

    ``x`` is pixel-space in [0, 1]; normalization happens here (buffers excluded from the
    state_dict). ``family`` says how features are read: 'own' (forward_features + fc), 'timm'
    (forward_features + forward_head(pre_logits=True)), 'tv' (the input of the final Linear).
    """

    def __init__(self, body: nn.Module, family: str, head: str, spec: str, num_classes: int,
                 mean, std, in_chans: int):
        super().__init__()
        mean, std = tuple(mean), tuple(std)
        mean, std = mean * in_chans if len(mean) == 1 else mean, std * in_chans if len(std) == 1 else std
        if len(mean) != in_chans or len(std) != in_chans:
            raise EffdstlError(f"mean/std have {len(mean)}/{len(std)} values for {in_chans}-channel input")
        self.body, self.family, self.head_name = body, family, head
        self.spec, self.num_classes, self.in_chans = spec, num_classes, in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.feature_dim = self.head.in_features

    @property
    def head(self) -> nn.Linear:
        return self.body.get_submodule(self.head_name)

    def forward(self, x: torch.Tensor, features: bool = False):
        x = (x - self.mean) / self.std
        if not features:
            return self.body(x)
        if self.family == "own":
            f = self.body.forward_features(x)
            return self.body.fc(f), f
        if self.family == "timm":
            f = self.body.forward_head(self.body.forward_features(x), pre_logits=True)
            return self.head(f), f
        seen = []  # tv: capture what enters the classifier during an ordinary forward
        hook = self.head.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
        try:
            z = self.body(x)
        finally:
            hook.remove()
        return z, seen[-1].flatten(1)


def model_for(spec: str, data: Any, **kw: Any) -> nn.Module:
    """:func:`build_model` for a dataset (``data.Data``): its classes, channels, image size and
    normalization; ``kw``: pretrained, ckpt."""
    return build_model(spec, data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
                       mean=data.mean, std=data.std, **kw)


def build_model(spec: str, num_classes: int, in_chans: int = 3, image_size: int = 32,
                mean=(0.0,), std=(1.0,), pretrained: bool = False, ckpt: str | None = None) -> Net:
    """A Net by spec (see MODELS); ``ckpt`` loads weights after building (see load_checkpoint)."""
    spec = str(spec).strip()
    family, _, arg = spec.partition(":")
    if pretrained and family not in ("timm", "tv"):
        raise EffdstlError(f"pretrained: true needs a timm:NAME or tv:NAME model, not {spec}; use ckpt: PATH")
    if family == "mlp":
        hidden = [int(h) for h in arg.split("-") if h.isdigit()]
        if not hidden or len(hidden) != len(arg.split("-")) or min(hidden) < 1:
            raise EffdstlError(f"bad MLP spec '{spec}': give hidden widths like mlp:32 or mlp:256-256")
        body, head, family = MLP(in_chans * image_size * image_size, hidden, num_classes), "fc", "own"
    elif family == "cnn":
        if arg not in CNNS:
            raise unknown("cnn size", arg, CNNS)
        body, head, family = PlainCNN(in_chans, *CNNS[arg], num_classes), "fc", "own"
    elif spec in CIFAR_RESNETS:
        body, head, family = CifarResNet(*CIFAR_RESNETS[spec], num_classes, in_chans), "fc", "own"
    elif spec in WRNS:
        body, head, family = WideResNet(*WRNS[spec], num_classes, in_chans), "fc", "own"
    elif family == "timm" and arg:
        body, head = _timm(arg, num_classes, in_chans, pretrained)
    elif family == "tv" and arg:
        body, head = _tv(arg, num_classes, in_chans, pretrained)
    else:
        raise unknown("model", spec, MODELS)
    net = Net(body, family, head, spec, num_classes, mean, std, in_chans)
    if ckpt:
        load_checkpoint(net, ckpt)
    return net


def _cure(spec: str) -> str:
    return (f"pretrained weights for {spec} are not cached and cannot be downloaded (offline?): "
            f"download them once online, or pass a local checkpoint: ckpt: PATH")


def _timm(name: str, num_classes: int, in_chans: int, pretrained: bool) -> tuple[nn.Module, str]:
    import timm

    if not timm.is_model(name):
        raise unknown("timm model", name, timm.list_models())
    arch, dot, _ = name.partition(".")
    if dot and name not in timm.list_pretrained(f"{arch}.*"):  # a weights tag, e.g. resnet34d.ra2_in1k
        raise unknown(f"timm weights tag for {arch}", name, timm.list_pretrained(f"{arch}.*"))
    kw = dict(num_classes=num_classes, in_chans=in_chans)
    if pretrained:
        cached = _timm_cached(name)
        if cached:  # load the cached file directly: no hub round trip, works offline
            kw["pretrained_cfg_overlay"] = dict(file=cached, source="")
        elif not online("huggingface.co"):
            raise EffdstlError(_cure(f"timm:{name}"))
    try:
        body = timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as exc:
        if not pretrained:
            raise
        raise EffdstlError(f"{_cure(f'timm:{name}')} ({type(exc).__name__}: {str(exc)[:200]})") from None
    head = next((n for n, m in body.named_modules() if m is body.get_classifier()), None)
    if not isinstance(body.get_classifier(), nn.Linear) or head is None:
        raise EffdstlError(f"timm:{name} has no Linear classifier (found {type(body.get_classifier()).__name__}); "
                           f"choose another model")
    return body, head


def _timm_cached(name: str) -> str | None:
    """A local file holding timm ``name``'s pretrained weights, if the HF or torch hub cache has one."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, rev = cfg.hf_hub_id.partition("@")
        for f in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            hit = try_to_load_from_cache(repo, f, revision=rev or None)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        f = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if f.is_file():
            return str(f)
    return None


def _tv(name: str, num_classes: int, in_chans: int, pretrained: bool) -> tuple[nn.Module, str]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)  # classification models only
    full, (name, _, tag) = name, name.partition(".")  # tv:resnet50.IMAGENET1K_V1 picks those weights
    if name not in names:
        raise unknown("torchvision model", name, names)
    if tag:
        tags = [w.name for w in tvm.get_model_weights(name)]
        if tag not in tags:
            raise unknown(f"torchvision weights for {name}", tag, tags)
    if in_chans != 3:
        raise EffdstlError(f"tv:{full} takes 3-channel images, this dataset has {in_chans}; use timm:NAME (in_chans)")
    if not pretrained:
        body = tvm.get_model(name, weights=None, num_classes=num_classes)
    else:
        weights = tvm.get_model_weights(name)[tag] if tag else tvm.get_model_weights(name).DEFAULT
        url = weights.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if not cached.is_file() and not online(urlparse(url).hostname or "download.pytorch.org"):
            raise EffdstlError(_cure(f"tv:{full}"))
        try:
            body = tvm.get_model(name, weights=weights)
        except Exception as exc:
            raise EffdstlError(f"{_cure(f'tv:{name}')} ({type(exc).__name__}: {str(exc)[:200]})") from None
    # the classifier is the last Linear registered (fc, classifier[-1], heads.head, head)
    head = [n for n, m in body.named_modules() if isinstance(m, nn.Linear)]
    if not head:
        raise EffdstlError(f"tv:{name} has no Linear classifier; choose another model")
    lin = body.get_submodule(head[-1])
    if lin.out_features != num_classes:  # pretrained ImageNet head -> a fresh one for our classes
        parent, _, leaf = head[-1].rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, leaf, nn.Linear(lin.in_features, num_classes))
    return body, head[-1]


# -- weights --------------------------------------------------------------------------------

def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _body(net: nn.Module) -> nn.Module:
    return net.body if isinstance(net, Net) else net


def save_weights(net: nn.Module, path: str | Path) -> None:
    """``{"model": body state_dict, "model_spec", "num_classes"}``, written atomically."""
    from .files import atomic_write_bytes, tensor_bytes

    atomic_write_bytes(path, tensor_bytes({"model": {k: v.detach().cpu() for k, v in _body(net).state_dict().items()},
                                           "model_spec": getattr(net, "spec", None),
                                           "num_classes": getattr(net, "num_classes", None)}))


def _strip(sd: dict) -> dict:
    """Drop wrapper prefixes: DDP's 'module.', torch.compile's '_orig_mod.', a whole Net's 'body.'."""
    for prefix in ("module.", "_orig_mod.", "body."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _eg(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _read_weights(path: str | Path) -> Any:
    """``torch.load`` of a weights file (tensors only); every failure is one clear line."""
    path = Path(path)
    if not path.exists():
        raise EffdstlError(f"checkpoint {path} does not exist")
    if not path.is_file():  # a FIFO would block the read forever; a folder is no checkpoint
        kind = "a folder" if path.is_dir() else "a FIFO, device or socket"
        raise EffdstlError(f"checkpoint {path} is not a regular file ({kind}); pass a model.pt")
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols is no line for the user
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:  # a well-formed pickle of something weights_only refuses (not a corrupt file)
            raise EffdstlError(f"checkpoint {path} holds Python objects beyond tensors ({found.group(1)}), "
                               f"which are not loaded for safety; save only a state_dict") from None
        if _imports_names(path):  # a plain pickle (any protocol), not torch.save's zip
            raise EffdstlError(f"checkpoint {path} is a plain Python pickle (not written by torch.save), which is "
                               "not loaded for safety: unpickling it can run code; save a state_dict with "
                               "torch.save") from None
        raise EffdstlError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, pickle.PickleError, KeyError) as exc:
        raise EffdstlError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})") from None


# pickle opcodes that import a name or call one: what makes unpickling run code
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _imports_names(path: Path) -> bool:
    """Whether the file is a pickle stream, of any protocol (0-2 have no header), that imports or
    calls a name before it ends or breaks off; read by opcodes, nothing is executed."""
    import pickletools

    try:
        with open(path, "rb") as f:
            for op, _, _ in pickletools.genops(f):
                if op.name in _CODE_OPS:
                    return True
    except Exception:  # noqa: BLE001 - not a pickle stream (or broken before any such opcode)
        return False
    return False


def saved_spec(path: str | Path) -> str | None:
    """The model spec a model.pt written by :func:`save_weights` names (None for other files)."""
    obj = _read_weights(path)
    return obj.get("model_spec") if isinstance(obj, dict) else None


def load_checkpoint(net: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``net`` (its body for a Net) from our model.pt, {"state_dict": ...} or a raw
    state_dict (timm/torchvision/RepDistiller files included); every failure is one clear line."""
    path = Path(path)
    obj = _read_weights(path)
    meta = obj if isinstance(obj, dict) else {}
    sd = obj
    for key in ("model", "state_dict", "model_state_dict", "net"):
        if isinstance(meta.get(key), dict):
            sd = meta[key]
            break
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise EffdstlError(f"checkpoint {path} holds no state_dict (expected {{'model': state_dict}}, "
                           f"{{'state_dict': ...}} or a plain state_dict of tensors)")
    body, name = _body(net), getattr(net, "spec", type(net).__name__)
    sd = _strip(sd)
    own = body.state_dict()
    src = f" (saved from {meta['model_spec']})" if meta.get("model_spec") not in (None, name) else ""
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise EffdstlError(f"checkpoint {path}{src} does not fit {name}: {len(missing)} missing keys"
                           f"{f' (e.g. {_eg(missing)})' if missing else ''}, {len(extra)} unexpected"
                           f"{f' (e.g. {_eg(extra)})' if extra else ''}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            hint = ""
            head = getattr(net, "head_name", "fc")
            if k.startswith(head + ".") and v.shape[:1] != own[k].shape[:1]:
                hint = (f"; it was trained for {v.shape[0]} classes and the model has {own[k].shape[0]} "
                        f"(a checkpoint from another dataset?)")
            raise EffdstlError(f"checkpoint {path}{src} does not fit {name}: shape of {k} is {tuple(v.shape)} "
                               f"in the checkpoint but {tuple(own[k].shape)} in the model{hint}")
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad:  # a network that diverged: as a teacher it would hand out NaN targets
        raise EffdstlError(f"checkpoint {path}{src} holds non-finite weights (NaN or inf in {bad}): the network "
                           "diverged when it was trained; retrain it (e.g. with a lower lr)")
    body.load_state_dict(sd, strict=False)  # strict except the tolerated num_batches_tracked
    return net
