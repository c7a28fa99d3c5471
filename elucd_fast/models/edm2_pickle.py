"""Reading EDM2's network pickles (`edm2-img64-s-1073741-0.075.pkl`, `edm2-img512-xxl-...pkl`, and
the snapshots of its training loop) without running any code from the file.

EDM2 writes `pickle.dump(dnnlib.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=net))`,
with the network in float16 and every network and encoder object from a class decorated by its
`persistence` module, as EDM does; the restricted unpickler of `edm_pickle` reads it (the EasyDict
becomes a dict, the encoder's float32 numpy arrays small tensors). Here the records are mapped to
our classes:

- `ema` (a `Precond` over `UNet`, `Block`, `MPConv`, `MPFourier`) -> `EDM2Precond` built with the
  recorded constructor arguments, cast to float16 BEFORE the strict load, so the stored float16
  tensors stay exactly as EDM2 computes with them (loading them into a float32 module would be
  about 1e-4 relative off EDM2's output);
- `encoder` -> our `StandardRGBEncoder` (img64) or `StabilityVAEEncoder` (img512; its `scale` and
  `bias`, and the VAE's name: the VAE itself is never in the file and is attached by the caller);
- `loss_fn` (`EDM2Loss`) and `dataset_kwargs` are read inertly and ignored or described.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_state_dict_strict, sha256_file
from .edm2_encoders import EDM2_ENCODER_CLASSES, StabilityVAEEncoder, StandardRGBEncoder
from .edm2_networks import EDM2_PICKLE_CLASSES, EDM2Precond
from .edm_pickle import PersistentRecord, constructor_arguments, module_tensors, read_persistent_pickle

KIND = "edm2-network-pickle"


def is_edm2_pickle_data(data: dict) -> bool:
    """Whether a read pickle holds an EDM2 network (its `ema` is EDM2's `Precond`)."""
    record = data.get("ema")
    return isinstance(record, PersistentRecord) and record.class_name == "Precond"


def _records(path: str | os.PathLike, data: dict | None = None) -> tuple[Path, dict[str, Any], PersistentRecord]:
    source = Path(path).expanduser()
    data = read_persistent_pickle(source) if data is None else data
    if not is_edm2_pickle_data(data):
        found = data.get("ema")
        name = found.class_name if isinstance(found, PersistentRecord) else type(found).__name__
        raise CheckpointError(f"{source}: not an EDM2 network pickle ('ema' is {name!r}, EDM2's is 'Precond'); "
                              f"the pickle holds {sorted(map(str, data))}")
    return source, data, data["ema"]


def _encoder(record: object, source: Path) -> StandardRGBEncoder | StabilityVAEEncoder:
    """Our encoder for the pickle's encoder record (img64's identity, img512's SD-VAE whitening)."""
    if record is None:
        return StandardRGBEncoder()  # pickles of EDM2's posthoc reconstruction of img64 carry one too
    if not isinstance(record, PersistentRecord) or record.class_name not in EDM2_ENCODER_CLASSES:
        found = record.class_name if isinstance(record, PersistentRecord) else type(record).__name__
        raise CheckpointError(f"{source}: encoder is {found!r}, not one of {sorted(EDM2_ENCODER_CLASSES)}")
    if record.class_name == "StandardRGBEncoder":
        return StandardRGBEncoder()
    state = record.state if isinstance(record.state, dict) else {}
    scale, bias = state.get("scale"), state.get("bias")
    if not (isinstance(scale, torch.Tensor) and isinstance(bias, torch.Tensor)):
        raise CheckpointError(f"{source}: the StabilityVAEEncoder record holds no scale and bias arrays")
    vae_name, batch_size = state.get("vae_name"), state.get("batch_size", 8)
    if not isinstance(vae_name, str) or isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise CheckpointError(f"{source}: the StabilityVAEEncoder record's vae_name / batch_size are malformed")
    try:
        return StabilityVAEEncoder(scale, bias, vae_name=vae_name, batch_size=batch_size)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def load_edm2_network(path: str | os.PathLike, *, device: str | torch.device = "cpu"
                      ) -> tuple[EDM2Precond, StandardRGBEncoder | StabilityVAEEncoder]:
    """The EDM2 network of a pickle, rebuilt from our classes with its stored float16 weights, and
    its encoder. Nothing from the file is executed.

    Returns:
        (net, encoder): `EDM2Precond` in eval mode with frozen parameters (float16 as stored;
        call it as `net(x, sigma, class_labels)`), and a `StandardRGBEncoder` (img64) or a
        `StabilityVAEEncoder` without its VAE (img512: attach `sd-vae-ft-mse` with `use_vae`).

    Raises:
        CheckpointError: what the restricted unpickler refuses, a file that is not EDM2's, an
            unknown class anywhere in the network, unrecorded constructor arguments, or weights
            that do not fit the rebuilt network or are not finite.
    """
    source, data, record = _records(path)
    parameters, buffers = module_tensors(record, set(EDM2_PICKLE_CLASSES), source=source)
    args, kwargs = constructor_arguments(record, source=source)
    try:
        with torch.random.fork_rng(devices=[]):  # the random initial weights are replaced below
            net = EDM2Precond(*args, **kwargs)
    except Exception as err:  # a constructor rejects bad arguments with several types
        raise CheckpointError(f"{source}: cannot build EDM2Precond from the recorded arguments {kwargs} "
                              f"({type(err).__name__}: {err})") from err
    dtypes = {t.dtype for t in parameters.values()}
    if len(dtypes) == 1:
        net = net.to(dtypes.pop())  # float16 in EDM2's files: computed with exactly as stored
    load_state_dict_strict(net, {**parameters, **buffers}, str(source))
    return net.eval().requires_grad_(False).to(device), _encoder(data.get("encoder"), source).to(device)


def describe_edm2_pickle(path: str | os.PathLike, *, data: dict | None = None) -> dict[str, Any]:
    """What an EDM2 pickle holds (read as `load_edm2_network` reads it, nothing built or run):
    kind, architecture, resolution, channels, label_dim, parameters, dtype, sha256, the
    constructor arguments, the encoder and its VAE name, and dataset_kwargs. `data`: the file
    as `read_persistent_pickle` already read it."""
    source, data, record = _records(path, data)
    parameters, _ = module_tensors(record, set(EDM2_PICKLE_CLASSES), source=source)
    _, kwargs = constructor_arguments(record, source=source)
    encoder = _encoder(data.get("encoder"), source)
    dataset_kwargs = data.get("dataset_kwargs")
    return {
        "kind": KIND,
        "architecture": "EDM2Precond(EDM2UNet)",
        "resolution": kwargs.get("img_resolution"),
        "channels": kwargs.get("img_channels"),
        "label_dim": kwargs.get("label_dim"),
        "parameters": sum(t.numel() for t in parameters.values()),
        "dtype": ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in parameters.values()})),
        "sha256": sha256_file(source),
        "constructor": kwargs,
        "encoder": type(encoder).__name__,
        "vae_name": getattr(encoder, "vae_name", None),
        "keys": [str(k) for k in data],
        "dataset_kwargs": dataset_kwargs if isinstance(dataset_kwargs, dict) else None,
    }
