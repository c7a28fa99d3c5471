"""EDM and EDM2 network pickles for the tests, written the way those projects' training loops
write their snapshots, from our own network classes.

EDM's persistence (`torch_utils/persistence.py`) pickles an instance of a decorated class as the
call `torch_utils.persistence._reconstruct_persistent_obj(meta)`, with

    meta = dict(type="class", version=6, module_src=<source of the class's module>,
                class_name=<class name>, state=<the instance's __dict__>)

and no BUILD step. The decorator records each instance's constructor arguments in its `__dict__`
as `_init_args` (a tuple, empty for EDM's keyword-only calls) and `_init_kwargs` (a dict), after
the constructor has run. Every layer of EDM's networks is decorated; `torch.nn.ModuleDict`s are
not and pickle as torch pickles them (NEWOBJ, then BUILD with their `__dict__`). Tensors pickle
as torch pickles them (`torch._utils._rebuild_tensor_v2` or `_rebuild_parameter` around
`torch.storage._load_from_bytes`).

EDM's layers get some constructor arguments from `np.sqrt`, so its pickles hold numpy float64
scalars (`numpy.core.multiarray.scalar` with `numpy.dtype`; `numpy._core` under numpy 2): the
ADM U-Net's `init_weight` / `init_bias` sqrt(1/3) and label embedding `init_weight`
sqrt(label_dim), the DDPM++/NCSN++ U-Net's `skip_scale` sqrt(0.5) (also an attribute of each
block) and attention `init_weight` sqrt(0.2). `build_edm_network` gives those values that type.

EDM's training loop (`training/training_loop.py`) saves, with `pickle.dump` at Python's default
protocol (4),

    dict(ema=<network>, loss_fn=<VPLoss | VELoss | EDMLoss>, augment_pipe=<AugmentPipe or None>,
         dataset_kwargs=dict(...))

each torch module first `copy.deepcopy(...).eval().requires_grad_(False).cpu()`. EDM2's saves a
`dnnlib.util.EasyDict(encoder=..., dataset_kwargs=<EasyDict>, loss_fn=<EDM2Loss>, ema=...)` with
the network `copy.deepcopy(...).cpu().eval().requires_grad_(False).to(torch.float16)`; its
`StabilityVAEEncoder` keeps the float32 numpy arrays `scale` and `bias` (4 values each).

Each file here follows that layout with our placeholder text as `module_src`, one per module. While writing, the
globals the files name (`torch_utils.persistence._reconstruct_persistent_obj`,
`dnnlib.util.EasyDict`) are stand-ins of this module registered in `sys.modules`; afterwards
nothing of them is importable, so a loader has only the file to go on.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
import pickletools
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elucd_fast.models import edm_networks

PERSISTENCE_VERSION = 6


@functools.cache
def placeholder_source(module: str) -> str:
    """What the files carry as the source of `module` (e.g. "training/networks.py"): our text,
    never EDM's; one string object per module, as EDM keeps one source per module (so a file
    holds it once), long enough to be pickled with the same opcode as a real source."""
    return (f"# elucd-fast test fixture: stands in for the source of {module}\n"
            "# that EDM's persistence stores with every object of a class defined there.\n"
            "# A loader must never run it; this text only has to be a string of such a size.\n" * 2)


# The module of EDM's and EDM2's code that defines each persistent class of their pickles.
_CLASS_MODULES = {
    **{name: "training/networks.py" for name in edm_networks.NETWORK_CLASS_NAMES},
    "VPLoss": "training/loss.py", "VELoss": "training/loss.py", "EDMLoss": "training/loss.py",
    "AugmentPipe": "training/augment.py",
    **{name: "training/networks_edm2.py" for name in ("MPFourier", "MPConv", "Block", "UNet", "Precond")},
    "StandardRGBEncoder": "training/encoders.py", "StabilityVAEEncoder": "training/encoders.py",
    "EDM2Loss": "training/training_loop.py",
}

# --- The globals the files name, registered only while writing. ---


def _reconstruct_persistent_obj(meta: dict) -> dict:
    """What an ordinary `pickle.load` calls for each persistent object. Like EDM's persistence,
    it executes the stored module source (that is what makes such files dangerous); it returns
    the description, without building an object."""
    exec(meta["module_src"], {"__name__": "_fixture_module"})  # noqa: S102 (the danger shown)
    return meta


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EasyDict(dict):
    """Pickles as EDM2's `dnnlib.util.EasyDict`, a dict with attribute access, does."""


EasyDict.__module__ = "dnnlib.util"


@contextlib.contextmanager
def _edm_modules() -> Iterator[None]:
    """`torch_utils.persistence` and `dnnlib.util` importable, with the stand-ins above."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
               "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    clashes = sorted(set(modules) & set(sys.modules))
    if clashes:
        raise RuntimeError(f"modules {clashes} are already imported; the fixtures need their names")
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            del sys.modules[name]


# --- Persistent objects. ---


class Persistent:
    """Pickles as EDM's persistence pickles an instance of `class_name` whose `__dict__` is
    `state`. For objects that are not our torch modules (losses, augmentation pipelines,
    encoders) and for hand-made hostile files."""

    def __init__(self, class_name: str, state: object, module_src: str | None = None, **meta: object) -> None:
        if module_src is None:
            module_src = placeholder_source(_CLASS_MODULES.get(class_name, "training/unknown.py"))
        self.meta = {**dict(type="class", version=PERSISTENCE_VERSION, module_src=module_src, class_name=class_name,
                            state=state), **meta}


def _is_persistent_module(obj: object) -> bool:
    return isinstance(obj, torch.nn.Module) and "_init_kwargs" in obj.__dict__


class _EdmPickler(pickle.Pickler):
    """Pickles modules built by `build_edm_network` (and EDM2 stand-ins) and `Persistent`
    objects as EDM's persistence does; everything else as usual."""

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, Persistent):
            return _reconstruct_persistent_obj, (obj.meta,)
        if _is_persistent_module(obj):
            # Our networks also keep their arguments as `init_kwargs`, which EDM's do not.
            state = {name: value for name, value in obj.__dict__.items() if name != "init_kwargs"}
            name = EDM2_CLASS_NAMES.get(type(obj).__name__, type(obj).__name__)
            return _reconstruct_persistent_obj, (Persistent(name, state).meta,)
        return NotImplemented


def write_pickle(path: Path, data: object, protocol: int = 4) -> Path:
    """`path` holding `data` pickled as EDM's code would pickle it (see the module docstring)."""
    with _edm_modules(), open(path, "wb") as f:
        _EdmPickler(f, protocol=protocol).dump(data)
    return path


def pickle_bytes(data: object, protocol: int = 4) -> bytes:
    """`data` pickled as `write_pickle` writes it."""
    buffer = io.BytesIO()
    with _edm_modules():
        _EdmPickler(buffer, protocol=protocol).dump(data)
    return buffer.getvalue()


def load_unsafely(path: Path) -> object:
    """An ordinary `pickle.load` of `path`, with EDM's globals available: what the loader under
    test must never do. Runs each persistent object's module source."""
    with _edm_modules(), open(path, "rb") as f:
        return pickle.load(f)


def rename_globals(raw: bytes, renames: dict[str, str]) -> bytes:
    """The pickle `raw` with the module names of its globals renamed (e.g. numpy 1's
    `numpy.core.multiarray` to numpy 2's `numpy._core.multiarray`): what the same objects
    pickle as under another library version. Frames, optional for readers, are dropped because
    the renamed strings change their lengths."""
    ops = list(pickletools.genops(raw))
    out = bytearray()
    for (op, arg, pos), (_, _, end) in zip(ops, ops[1:] + [(None, None, len(raw))]):
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg in renames:
            name = renames[arg].encode()
            out += b"\x8c" + bytes([len(name)]) + name
        elif op.name == "GLOBAL" and arg.split(" ")[0] in renames:
            module, name = arg.split(" ")
            out += b"c" + renames[module].encode() + b"\n" + name.encode() + b"\n"
        else:
            out += raw[pos:end]
    return bytes(out)


def pickle_globals(raw: bytes) -> set[tuple[str, str]]:
    """The (module, name) of every global the pickle `raw` names, read from its opcodes."""
    found = set()
    memo: dict[int, object] = {}
    recent: list[object] = [None, None]  # the last two values pushed, when they are strings
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ("PROTO", "FRAME"):
            continue
        if op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1]
            continue
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = recent[-1]
            continue
        if op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add((recent[-2], recent[-1]))
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            value = arg
        else:
            value = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else None
        recent = [recent[-1], value]
    return found


NUMPY_2_NAMES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}

# --- EDM networks, built as EDM builds its own. ---

# Constructor arguments (and UNetBlock's attribute) that EDM computes with np.sqrt. Every float
# EDM passes under these names comes from np.sqrt except the 1e-5 of SongUNet's `init_zero`.
_NUMPY_FLOAT_NAMES = ("init_weight", "init_bias", "skip_scale")
_LITERAL_FLOATS = (1e-5,)


def _as_edm_has_it(value: object, name: str | None = None) -> object:
    """Constructor arguments as EDM's pickles record them: the floats EDM computes with np.sqrt
    as numpy float64, and lists where our defaults are tuples (EDM's are lists), nested too."""
    if isinstance(value, dict):
        return {key: _as_edm_has_it(item, key) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_as_edm_has_it(item) for item in value]
    if name in _NUMPY_FLOAT_NAMES and type(value) is float and value not in _LITERAL_FLOATS:
        return np.float64(value)
    return value


def _recording(init: Any, shared: dict[float, np.float64]) -> Any:
    @functools.wraps(init)
    def recording_init(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # An attribute keeps the object the network passed down: one numpy scalar for all blocks.
        for name in _NUMPY_FLOAT_NAMES:
            if name in self.__dict__:
                value = self.__dict__[name]
                self.__dict__[name] = shared.setdefault(value, _as_edm_has_it(value, name)) \
                    if type(value) is float else value
        # As EDM's persistence records them: after the constructor, deep copies.
        self._init_args = copy.deepcopy(args)
        self._init_kwargs = _as_edm_has_it(kwargs)

    return recording_init


@contextlib.contextmanager
def _recording_constructors(classes: list[type]) -> Iterator[None]:
    originals = {cls: cls.__dict__["__init__"] for cls in classes}
    shared: dict[float, np.float64] = {}
    try:
        for cls, init in originals.items():
            cls.__init__ = _recording(init, shared)
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


def build_edm_network(class_name: str, **kwargs: Any) -> torch.nn.Module:
    """Our network `class_name` (e.g. "EDMPrecond") built from `kwargs` as EDM builds its own:
    every layer records its constructor arguments as `_init_args` / `_init_kwargs`, with numpy
    float64 where EDM has them. It runs as our network does (numpy float64 is a float)."""
    classes = [getattr(edm_networks, name) for name in sorted(edm_networks.NETWORK_CLASS_NAMES)]
    with _recording_constructors(classes):
        return getattr(edm_networks, class_name)(**kwargs)


# EDM's U-Net configurations (`train.py --arch`), in the order EDM passes them.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    "adm": dict(model_type="DhariwalUNet"),
}
PRECONDITIONERS = {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond", "iddpm": "iDDPMPrecond"}
LOSSES = {"VPPrecond": "VPLoss", "VEPrecond": "VELoss", "EDMPrecond": "EDMLoss"}
RESOLUTION = 16
CHANNELS = 3
LABELS = 10
# Tiny widths; the ADM needs 64 channels at the attention level for one 64-channel head.
TINY_WIDTH = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
TINY_ADM_WIDTH = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
#: ImageNet-64's network, `edm-imagenet-64x64-cond-adm.pkl` (`train.py --arch=adm --precond=edm
#: --cond=1 --dropout=0.10 --fp16=1` on 64x64 ImageNet).
IMAGENET64_ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1,
                      use_fp16=True, img_resolution=64, img_channels=3, label_dim=1000)
IMAGENET64_ADM_PARAMETERS = 295_899_267


def perturb_(net: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Adds noise to every parameter: EDM zero-initialises output layers, which would make the
    U-Net output 0 and comparisons of outputs trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return net


def edm_network(precond: str, arch: str, *, label_dim: int = LABELS, augment_dim: int = 0, use_fp16: bool = False,
                dropout: float = 0.13, resolution: int = RESOLUTION, seed: int = 0, **width: Any) -> torch.nn.Module:
    """A tiny network of EDM's `train.py --precond=PRECOND --arch=ARCH` (precond "vp", "ve",
    "edm" or "iddpm"; arch "ddpmpp", "ncsnpp" or "adm"), its arguments in the order EDM passes
    them, weights perturbed, in eval mode."""
    kwargs = dict(ARCHITECTURES[arch], **(width or (TINY_ADM_WIDTH if arch == "adm" else TINY_WIDTH)))
    if augment_dim:
        kwargs["augment_dim"] = augment_dim
    kwargs.update(dropout=dropout, use_fp16=use_fp16)
    torch.manual_seed(seed)
    net = build_edm_network(PRECONDITIONERS[precond], **kwargs, img_resolution=resolution, img_channels=CHANNELS,
                            label_dim=label_dim)
    return perturb_(net, seed + 1).eval()


# --- Persistent objects of a snapshot other than the network, with EDM's attributes. ---

_LOSS_ATTRIBUTES = {
    "VPLoss": dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5),
    "VELoss": dict(sigma_min=0.02, sigma_max=100),
    "EDMLoss": dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
    "EDM2Loss": dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5),
}
# AugmentPipe's attributes, its constructor arguments as floats, with their defaults.
_AUGMENT_DEFAULTS = dict(
    p=1, xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125, scale=0, rotate_frac=0,
    aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5,
    translate_frac_std=0.125, brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
    contrast_std=0.5, hue_max=1, saturation_std=1)
#: `train.py --augment=P`'s pipeline (EDM trains CIFAR-10, FFHQ and AFHQ with P = 0.12 or 0.15).
EDM_AUGMENT_KWARGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def loss_record(class_name: str, **kwargs: float) -> Persistent:
    """EDM's `VPLoss`, `VELoss`, `EDMLoss` or EDM2's `EDM2Loss` built with `kwargs`."""
    state = {**_LOSS_ATTRIBUTES[class_name], **kwargs}
    return Persistent(class_name, {**state, "_init_args": (), "_init_kwargs": dict(kwargs)})


def augment_pipe_record(p: float = 0.12, **kwargs: float) -> Persistent:
    """EDM's `AugmentPipe(p, **kwargs)`, EDM's CIFAR-10 settings by default."""
    kwargs = dict(p=p, **(kwargs or EDM_AUGMENT_KWARGS))
    state = {name: float(kwargs.get(name, default)) for name, default in _AUGMENT_DEFAULTS.items()}
    return Persistent("AugmentPipe", {**state, "_init_args": (), "_init_kwargs": kwargs})


def dataset_kwargs(resolution: int, use_labels: bool, path: str = "datasets/tiny-16x16.zip",
                   max_size: int = 100) -> dict[str, Any]:
    """What EDM's `train.py` records about the training set."""
    return dict(class_name="training.dataset.ImageFolderDataset", path=path, use_labels=use_labels, xflip=False,
                cache=True, resolution=resolution, max_size=max_size)


def edm_snapshot(ema: torch.nn.Module, *, augment_pipe: Persistent | None = None,
                 dataset: dict[str, Any] | None = None, copy_network: bool = True) -> dict[str, Any]:
    """The dict EDM's training loop pickles: the network (copied, in eval mode, frozen, on the
    CPU), the loss matching its preconditioner, `augment_pipe` and the dataset options.
    `copy_network=False` puts `ema` itself there (after the same mode changes), sparing the
    memory of a copy of a large network; the pickle is the same."""
    precond = type(ema).__name__
    data = dict(ema=ema, loss_fn=loss_record(LOSSES.get(precond, "EDMLoss")), augment_pipe=augment_pipe,
                dataset_kwargs=dict(dataset if dataset is not None else
                                    dataset_kwargs(ema.img_resolution, bool(ema.label_dim))))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            value = copy.deepcopy(value) if copy_network else value
            data[key] = value.eval().requires_grad_(False).cpu()
    return data


def write_edm_snapshot(path: Path, ema: torch.nn.Module, *, protocol: int = 4, **snapshot: Any) -> Path:
    """`path` written as EDM's training loop writes `network-snapshot-*.pkl`."""
    return write_pickle(path, edm_snapshot(ema, **snapshot), protocol)


# --- EDM2 snapshots. ---


class MPFourier(torch.nn.Module):
    """Stand-in with the class name and buffers of EDM2's Fourier embedding."""

    def __init__(self, num_channels: int, bandwidth: float = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))


class MPConv(torch.nn.Module):
    """Stand-in with the class name and weight of EDM2's magnitude-preserving convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))


class Block(torch.nn.Module):
    """Stand-in with the class name of EDM2's U-Net block."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc") -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])


class UNet(torch.nn.Module):
    """Stand-in with the class name, submodule kinds and ModuleDicts of EDM2's U-Net."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 8) -> None:
        super().__init__()
        self.label_balance = 0.5
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(model_channels)
        self.emb_noise = MPConv(model_channels, model_channels, kernel=[])
        self.emb_label = MPConv(label_dim, model_channels, kernel=[]) if label_dim else None
        self.enc = torch.nn.ModuleDict({f"{img_resolution}x{img_resolution}_block0": Block(
            img_channels + 1, model_channels, model_channels)})
        self.dec = torch.nn.ModuleDict({f"{img_resolution}x{img_resolution}_block0": Block(
            model_channels, model_channels, model_channels, flavor="dec")})
        self.out_conv = MPConv(model_channels, img_channels, kernel=[3, 3])


class Precond(torch.nn.Module):
    """Stand-in with the class name and attributes of EDM2's preconditioner."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 8, **unet_kwargs: Any) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])


# Our EDM2 classes and the names EDM2's own classes (and so its pickles) have.
EDM2_CLASS_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet", "EDM2Block": "Block"}


def build_edm2_network(**kwargs: Any) -> torch.nn.Module:
    """Our `EDM2Precond` built from `kwargs` as EDM2 builds its own: every layer records its
    constructor arguments as EDM2's persistence does, so `write_edm2_snapshot` writes the file
    EDM2's training loop (and `reconstruct_phema.py`, which copies that dict) would write."""
    from elucd_fast.models import edm2_networks as e2

    with _recording_constructors([e2.MPFourier, e2.MPConv, e2.EDM2Block, e2.EDM2UNet, e2.EDM2Precond]):
        return e2.EDM2Precond(**kwargs)


def build_edm2_standin(**kwargs: Any) -> torch.nn.Module:
    """A tiny EDM2-like `Precond` whose layers record their constructor arguments as EDM2's
    persistence does: a network of the EDM2 class names with made-up state."""
    with _recording_constructors([MPFourier, MPConv, Block, UNet, Precond]):
        return Precond(**kwargs)


#: EDM2's `StabilityVAEEncoder` defaults: SD VAE statistics of the raw latents (SPEC.md, 9).
VAE_RAW_MEAN = [5.81, 3.25, 0.12, -2.15]
VAE_RAW_STD = [4.17, 4.62, 3.71, 3.28]


def encoder_record(class_name: str) -> Persistent:
    """EDM2's `StandardRGBEncoder()` (img64) or `StabilityVAEEncoder()` (img512) as its training
    loop pickles it; the VAE encoder keeps float32 numpy arrays, computed as EDM2 does, and never
    its VAE (`_vae` is None)."""
    # The base class's constructor records empty arguments first; the subclass's overwrites them.
    state: dict[str, Any] = dict(_init_args=(), _init_kwargs={})
    if class_name == "StabilityVAEEncoder":
        scale = np.float32(0.5) / np.float32(VAE_RAW_STD)
        state.update(vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                     bias=np.float32(0) - np.float32(VAE_RAW_MEAN) * scale, batch_size=8, _vae=None)
    elif class_name != "StandardRGBEncoder":
        raise ValueError(f"unknown EDM2 encoder {class_name!r}")
    return Persistent(class_name, state)


def edm2_snapshot(ema: torch.nn.Module, encoder: str = "StandardRGBEncoder") -> EasyDict:
    """The `EasyDict` EDM2's training loop pickles, network in float16."""
    data = EasyDict(encoder=encoder_record(encoder),
                    dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset",
                                            path="datasets/tiny.zip", use_labels=True),
                    loss_fn=loss_record("EDM2Loss", P_mean=-0.8, P_std=1.6))
    data["ema"] = copy.deepcopy(ema).cpu().eval().requires_grad_(False).to(torch.float16)
    return data


def write_edm2_snapshot(path: Path, ema: torch.nn.Module, encoder: str = "StandardRGBEncoder", *,
                        protocol: int = 4, numpy_2: bool = False) -> Path:
    """`path` written as EDM2's training loop writes `network-snapshot-*.pkl`; `numpy_2` gives
    the numpy names a file written under numpy 2 has."""
    raw = pickle_bytes(edm2_snapshot(ema, encoder), protocol)
    path.write_bytes(rename_globals(raw, NUMPY_2_NAMES) if numpy_2 else raw)
    return path


def inputs(batch: int = 2, seed: int = 2, resolution: int = RESOLUTION,
           label_dim: int = LABELS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noisy images (batch, CHANNELS, resolution, resolution) and one-hot labels (or None)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, resolution, resolution, generator=generator)
    if not label_dim:
        return x, None
    return x, torch.eye(label_dim)[torch.randint(label_dim, (batch,), generator=generator)]
