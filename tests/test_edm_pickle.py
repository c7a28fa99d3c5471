"""Reading EDM and EDM2 network pickles without running their code.

The files are written by `edm_fixtures` exactly as EDM's and EDM2's training loops write their
snapshots (numpy scalars and arrays included), for every preconditioner and U-Net EDM ships; the
facts about those files (their globals, numpy's records) are checked here against what the
installed numpy and torch write. Hostile files must be refused with nothing from them executed.
"""
import codecs
import collections
import gc
import hashlib
import io
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import edm_fixtures as fx
import numpy as np
import pytest
import torch

from elucd_fast.models import edm_networks
from elucd_fast.models.checkpoint import CheckpointError, sha256_file
from elucd_fast.models.edm_pickle import (
    MAX_ARRAY_ELEMENTS,
    ModuleDictRecord,
    PersistentRecord,
    constructor_arguments,
    describe_edm_pickle,
    load_edm_network,
    module_tensors,
    read_persistent_pickle,
)

# Where the installed numpy keeps its pickling functions: numpy.core (1.x) or numpy._core (2.x).
NUMPY_SCALAR = np.float64(0).__reduce__()[0]
NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]
NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
NUMPY_CORE = NUMPY_SCALAR.__module__

TORCH_GLOBALS = {("torch_utils.persistence", "_reconstruct_persistent_obj"), ("torch.storage", "_load_from_bytes"),
                 ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                 ("collections", "OrderedDict"), ("torch.nn.modules.container", "ModuleDict")}
# The globals of files written by EDM's own training loop (every architecture) and EDM2's (img512;
# img64 has no numpy), protocol 4.
EDM_SNAPSHOT_GLOBALS = TORCH_GLOBALS | {("numpy", "dtype"), (NUMPY_CORE, "scalar")}
EDM2_IMG512_GLOBALS = TORCH_GLOBALS | {("dnnlib.util", "EasyDict"), ("numpy", "dtype"), ("numpy", "ndarray"),
                                       (NUMPY_CORE, "_reconstruct")}
EDM2_IMG64_GLOBALS = TORCH_GLOBALS | {("dnnlib.util", "EasyDict")}

# (preconditioner, architecture, conditional): every combination EDM's train.py offers.
EDM_CASES = [(precond, arch, cond) for precond in ("vp", "ve", "edm") for arch in ("ddpmpp", "ncsnpp", "adm")
             for cond in (True, False)]


def case_id(case) -> str:
    precond, arch, cond = case
    return f"{precond}-{arch}-{'cond' if cond else 'uncond'}"


def case_network(precond: str, arch: str, cond: bool) -> torch.nn.Module:
    # As EDM trains them: augmentation (and its labels) for CIFAR/FFHQ/AFHQ's DDPM++ and NCSN++;
    # fp16 on the conditional ones, as for ImageNet.
    return fx.edm_network(precond, arch, label_dim=fx.LABELS if cond else 0, augment_dim=9 if arch != "adm" else 0,
                          use_fp16=cond)


def write_case(path: Path, net: torch.nn.Module, protocol: int = 4) -> Path:
    augment = fx.augment_pipe_record() if net.model.map_augment is not None else None
    return fx.write_edm_snapshot(path, net, augment_pipe=augment, protocol=protocol)


def assert_same_network(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    assert type(loaded) is type(original) and type(loaded.model) is type(original.model)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    expected, found = original.state_dict(), loaded.state_dict()
    assert list(found) == list(expected)
    assert all(torch.equal(found[name], expected[name]) for name in expected)
    x, labels = fx.inputs(label_dim=original.label_dim)
    extra = {}
    if getattr(original.model, "map_augment", None) is not None:
        extra["augment_labels"] = torch.randn(x.shape[0], 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for sigma in (0.02, 0.7, torch.tensor([0.5, 20.0])):
            assert torch.equal(loaded(x, sigma, labels, **extra), original(x, sigma, labels, **extra))


@pytest.fixture
def marker(tmp_path):
    """A file that only running code from a pickle would create."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "code from the pickle ran"


# --- EDM's snapshots, as EDM writes them. ---

@pytest.mark.parametrize("case", EDM_CASES, ids=case_id)
def test_every_edm_configuration_loads_and_matches(tmp_path, case):
    original = case_network(*case)
    path = write_case(tmp_path / "network-snapshot-000000.pkl", original)
    net = load_edm_network(path)
    assert "torch_utils" not in sys.modules and "training" not in sys.modules
    assert net.init_kwargs == original.init_kwargs
    assert_same_network(net, original)


def test_iddpm_network_keeps_its_recorded_arguments(tmp_path):
    original = fx.edm_network("iddpm", "adm", use_fp16=True)
    net = load_edm_network(write_case(tmp_path / "net.pkl", original))
    assert net.use_fp16 is True and net.img_resolution == fx.RESOLUTION and net.label_dim == fx.LABELS
    assert torch.equal(net.u, original.u)
    assert_same_network(net, original)


def test_snapshots_carry_what_edm_writes(tmp_path):
    """The fixture files hold what EDM's own files hold: its globals, numpy float64 scalars where
    EDM computes np.sqrt, inert loss and augmentation records, the dataset options."""
    net = case_network("vp", "ddpmpp", True)
    path = write_case(tmp_path / "net.pkl", net)
    assert fx.pickle_globals(path.read_bytes()) == EDM_SNAPSHOT_GLOBALS
    adm = write_case(tmp_path / "adm.pkl", case_network("edm", "adm", True))
    assert fx.pickle_globals(adm.read_bytes()) == EDM_SNAPSHOT_GLOBALS

    data = read_persistent_pickle(path)
    assert list(data) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    assert data["loss_fn"].class_name == "VPLoss" and data["loss_fn"].state["beta_d"] == 19.9
    assert data["augment_pipe"].class_name == "AugmentPipe"
    assert data["augment_pipe"].init_kwargs == dict(p=0.12, **fx.EDM_AUGMENT_KWARGS)
    assert data["dataset_kwargs"] == fx.dataset_kwargs(fx.RESOLUTION, True)
    ema = data["ema"]
    assert ema.class_name == "VPPrecond" and ema.version == 6 and ema.init_args == ()
    block = ema.state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["8x8_block0"]
    assert isinstance(block, PersistentRecord) and block.class_name == "UNetBlock"
    # EDM's np.sqrt(0.5) and np.sqrt(0.2), decoded to Python floats.
    assert type(block.state["skip_scale"]) is float and block.state["skip_scale"] == math.sqrt(0.5)
    assert block.init_kwargs["skip_scale"] == math.sqrt(0.5) and block.init_kwargs["init_attn"]["init_weight"] == \
        math.sqrt(0.2)
    qkv = block.state["_modules"]["qkv"]
    assert qkv.init_kwargs == dict(in_channels=32, out_channels=96, kernel=1, init_mode="xavier_uniform",
                                   init_weight=math.sqrt(0.2))
    assert isinstance(ema.state["_modules"]["model"].state["_modules"]["enc"], ModuleDictRecord)
    assert isinstance(qkv.state["_parameters"]["weight"], torch.Tensor)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol(tmp_path, protocol):
    original = case_network("edm", "ncsnpp", True)
    path = write_case(tmp_path / "net.pkl", original, protocol=protocol)
    assert_same_network(load_edm_network(path), original)


def test_numpy_2_names(tmp_path):
    original = case_network("ve", "ddpmpp", False)
    raw = fx.pickle_bytes(fx.edm_snapshot(original, augment_pipe=fx.augment_pipe_record()))
    renamed = fx.rename_globals(raw, fx.NUMPY_2_NAMES)
    if NUMPY_CORE == "numpy.core.multiarray":
        assert ("numpy._core.multiarray", "scalar") in fx.pickle_globals(renamed)
    path = tmp_path / "numpy2.pkl"
    path.write_bytes(renamed)
    assert_same_network(load_edm_network(path), original)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_writes_the_records_the_reader_accepts(tmp_path, protocol):
    """numpy's scalars and arrays of every plain numeric dtype, both byte orders, C and Fortran
    order, as the installed numpy pickles them, read back as numbers and tensors."""
    scalars = [np.float64(0.5), np.float32(-1.25), np.float16(3.0), np.bool_(True), np.int8(-3), np.uint8(200),
               np.int16(-300), np.uint16(60000), np.int32(-7), np.uint32(4_000_000_000), np.int64(-2 ** 40),
               np.uint64(2 ** 63 + 5)]
    arrays = {"f4": np.float32([0.5, 0.25, -2.0]), "big": np.arange(6, dtype=">f8").reshape(2, 3),
              "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
              "strided": np.arange(8, dtype=np.float32)[::2], "zero-d": np.array(1.5, dtype=np.float16),
              "empty": np.zeros((0, 2), dtype=np.float32), "bool": np.array([True, False])}
    path = fx.write_pickle(tmp_path / "numbers.pkl", {"scalars": scalars, **arrays}, protocol)
    data = read_persistent_pickle(path)
    assert data["scalars"] == [s.item() for s in scalars]
    assert [type(v) for v in data["scalars"]] == [type(s.item()) for s in scalars]
    for name, array in arrays.items():
        tensor = data[name]
        assert isinstance(tensor, torch.Tensor) and tensor.shape == array.shape, name
        assert tensor.numpy().tolist() == array.tolist() and tensor.numpy().dtype == array.dtype.newbyteorder("="), name


def test_numpy_dtype_record_is_the_one_the_reader_expects():
    # numpy pickles a dtype as numpy.dtype(code, False, True), then BUILD with this state.
    for code, order in (("f8", "<"), ("f2", "<"), ("u1", "|"), ("b1", "|"), ("i4", ">")):
        dtype = np.dtype(order.replace("|", "=") + code)
        function, args, state = dtype.__reduce__()
        assert (function, args, state) == (np.dtype, (code, False, True), (3, order, None, None, None, -1, -1, 0))
    assert np.float32([1.0]).__reduce__()[1] == (np.ndarray, (0,), b"b")


def test_loss_and_augmentation_records_are_ignored(tmp_path, marker):
    original = case_network("vp", "ddpmpp", True)
    evil = f"open({str(marker)!r}, 'w').close()\n"
    data = fx.edm_snapshot(original, augment_pipe=fx.Persistent("AugmentPipe", {"p": 0.1}, module_src=evil))
    data["loss_fn"] = fx.Persistent("VPLoss", {"anything": [1, "two"]}, module_src=evil)
    path = fx.write_pickle(tmp_path / "net.pkl", data)
    assert_same_network(load_edm_network(path), original)


def test_load_leaves_the_global_random_stream_alone(tmp_path):
    path = write_case(tmp_path / "net.pkl", case_network("edm", "adm", True))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_edm_network(path)
    assert torch.equal(torch.rand(3), expected)


def test_describe(tmp_path):
    original = case_network("edm", "adm", True)
    path = write_case(tmp_path / "net.pkl", original)
    info = describe_edm_pickle(path)
    assert info == {
        "kind": "edm-network-pickle",
        "architecture": "EDMPrecond(DhariwalUNet)",
        "resolution": 16,
        "channels": 3,
        "label_dim": 10,
        "use_fp16": True,
        "parameters": sum(p.numel() for p in original.parameters()),
        "dtype": "float32",
        "sha256": sha256_file(path),
        "module_src_sha256": hashlib.sha256(fx.placeholder_source("training/networks.py").encode()).hexdigest(),
        "keys": ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"],
        "dataset_kwargs": fx.dataset_kwargs(16, True),
    }


def test_constructor_arguments_and_module_tensors(tmp_path):
    original = case_network("ve", "ncsnpp", False)
    ema = read_persistent_pickle(write_case(tmp_path / "net.pkl", original))["ema"]
    args, kwargs = constructor_arguments(ema)
    assert args == () and kwargs == {**fx.ARCHITECTURES["ncsnpp"], **fx.TINY_WIDTH, "augment_dim": 9,
                                     "dropout": 0.13, "use_fp16": False, "img_resolution": 16, "img_channels": 3,
                                     "label_dim": 0}
    parameters, buffers = module_tensors(ema, source=tmp_path / "net.pkl")
    state = original.state_dict()
    assert set(parameters) == {name for name, _ in original.named_parameters()}
    assert set(parameters) | set(buffers) == set(state)
    assert all(torch.equal(tensor, state[name]) for name, tensor in {**parameters, **buffers}.items())
    with pytest.raises(CheckpointError, match="unknown class 'VEPrecond'"):
        module_tensors(ema, {"SongUNet"})


# --- EDM2's snapshots: the records an EDM2 loader gets. ---

@pytest.mark.parametrize("encoder", ["StandardRGBEncoder", "StabilityVAEEncoder"])
@pytest.mark.parametrize("protocol, numpy_2", [(4, False), (4, True), (5, False), (2, False)])
def test_edm2_snapshots(tmp_path, encoder, protocol, numpy_2):
    torch.manual_seed(0)
    channels = 4 if encoder == "StabilityVAEEncoder" else 3
    net = fx.build_edm2_standin(img_resolution=8, img_channels=channels, label_dim=fx.LABELS)
    path = fx.write_edm2_snapshot(tmp_path / "network-snapshot-0000000-0.050.pkl", net, encoder, protocol=protocol,
                                  numpy_2=numpy_2)
    if protocol == 4 and not numpy_2:
        expected = EDM2_IMG512_GLOBALS if encoder == "StabilityVAEEncoder" else EDM2_IMG64_GLOBALS
        assert fx.pickle_globals(path.read_bytes()) == expected

    data = read_persistent_pickle(path)
    assert type(data) is dict and list(data) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    assert type(data["dataset_kwargs"]) is dict and data["dataset_kwargs"]["use_labels"] is True
    assert data["loss_fn"].class_name == "EDM2Loss" and data["loss_fn"].init_kwargs == dict(P_mean=-0.8, P_std=1.6)
    encoder_record = data["encoder"]
    assert encoder_record.class_name == encoder and encoder_record.init_kwargs == {}
    if encoder == "StabilityVAEEncoder":
        scale = np.float32(0.5) / np.float32(fx.VAE_RAW_STD)
        bias = -np.float32(fx.VAE_RAW_MEAN) * scale
        assert encoder_record.state["scale"].dtype == torch.float32
        assert torch.equal(encoder_record.state["scale"], torch.from_numpy(scale))
        assert torch.equal(encoder_record.state["bias"], torch.from_numpy(bias))
        assert encoder_record.state["vae_name"] == "stabilityai/sd-vae-ft-mse" and encoder_record.state["_vae"] is None

    ema = data["ema"]
    assert ema.class_name == "Precond" and constructor_arguments(ema) == ((), dict(
        img_resolution=8, img_channels=channels, label_dim=fx.LABELS))
    parameters, buffers = module_tensors(ema, {"Precond", "UNet", "Block", "MPConv", "MPFourier"})
    state = net.half().state_dict()
    assert set(parameters) | set(buffers) == set(state) and {t.dtype for t in parameters.values()} == {torch.float16}
    assert all(torch.equal(tensor, state[name]) for name, tensor in {**parameters, **buffers}.items())
    with pytest.raises(CheckpointError, match="'ema' is an unknown class 'Precond'"):
        load_edm_network(path)


# --- Files that must be refused, with nothing from them executed. ---

class Call:
    """Pickles as `function(*args)`, then BUILD with `state` when given."""

    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


class CallableAs(Call):
    """Like `Call`, and callable, so that pickle lets it stand as the function of another call:
    at load time that function is whatever `function(*args)` returned."""

    def __call__(self):
        raise AssertionError("never called while pickling")


def refused(path: Path, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_edm_network(path)
    with pytest.raises(CheckpointError, match=message):
        read_persistent_pickle(path)


@pytest.mark.parametrize("function", [os.system, "exec"])
def test_refuses_a_reduce_payload(tmp_path, marker, function):
    if function == "exec":
        payload = Call(exec, f"open({str(marker)!r}, 'w').close()")
    else:
        payload = Call(function, f"touch {marker}")
    path = fx.write_pickle(tmp_path / "evil.pkl", {"ema": payload})
    expected = "builtins.exec" if function == "exec" else f"{os.system.__module__}.system"
    refused(path, rf"evil\.pkl: refused the global {expected}")
    with pytest.raises(CheckpointError, match="refused the global"):
        describe_edm_pickle(path)


def test_never_runs_module_source(tmp_path, marker):
    evil_src = f"open({str(marker)!r}, 'w').close()\n"
    path = fx.write_pickle(tmp_path / "evil.pkl", {"ema": fx.Persistent("Payload", {}, module_src=evil_src)})
    with pytest.raises(CheckpointError, match="unknown class 'Payload'"):
        load_edm_network(path)

    # The same source on a real network: the file loads, the source still never runs.
    original = case_network("edm", "adm", True)
    data = fx.edm_snapshot(original)
    state = {name: value for name, value in data["ema"].__dict__.items() if name != "init_kwargs"}
    data["ema"] = fx.Persistent("EDMPrecond", state, module_src=evil_src)
    path = fx.write_pickle(tmp_path / "evil-net.pkl", data)
    assert_same_network(load_edm_network(path), original)
    assert not marker.exists()

    # Proof that the payload is live: an ordinary load runs it.
    fx.load_unsafely(path)
    assert marker.exists()
    marker.unlink()


def test_refuses_a_payload_inside_a_tensor_blob(tmp_path, marker):
    blob = io.BytesIO()
    torch.save(Call(os.system, f"touch {marker}"), blob, _use_new_zipfile_serialization=False)
    path = fx.write_pickle(tmp_path / "evil.pkl", {"ema": Call(torch.storage._load_from_bytes, blob.getvalue())})
    refused(path, "refused a nested tensor blob")


def six_element_storage() -> object:
    # The storage a tensor pickles with: a nested torch.save blob behind _load_from_bytes.
    return torch.arange(6.0).__reduce_ex__(2)[1][0]


@pytest.mark.parametrize("offset, size, stride", [(0, (1000,), (1,)), (5, (2,), (1,)), (0, (2, 3), (4, 1)),
                                                  (-1, (2,), (1,))])
def test_refuses_a_tensor_larger_than_its_storage(tmp_path, offset, size, stride):
    tensor = Call(torch._utils._rebuild_tensor_v2, six_element_storage(), offset, size, stride, False, OrderedDict())
    path = fx.write_pickle(tmp_path / "lie.pkl", {"ema": tensor})
    refused(path, "malformed layout" if offset < 0 else "tensor claims more data than its storage holds")


def test_refuses_resetting_a_tensor_past_its_storage(tmp_path):
    storage = six_element_storage()
    tensor = Call(torch._utils._rebuild_tensor_v2, storage, 0, (6,), (1,), False, OrderedDict(),
                  state=(storage, 0, (1000,), (1,)))
    refused(fx.write_pickle(tmp_path / "lie.pkl", {"ema": tensor}), "set the state of a tensor")


def test_refuses_an_unknown_global(tmp_path, monkeypatch, marker):
    module = types.ModuleType("some_module")

    class SomeClass:
        def __setstate__(self, state):
            marker.touch()

    SomeClass.__module__, SomeClass.__qualname__ = "some_module", "SomeClass"
    module.SomeClass = SomeClass
    monkeypatch.setitem(sys.modules, "some_module", module)
    instance = SomeClass()
    instance.x = 1
    path = fx.write_pickle(tmp_path / "unknown.pkl", {"ema": instance})
    refused(path, r"unknown\.pkl: refused the global some_module\.SomeClass")


def state_ops(obj: object) -> bytes:
    """The opcodes that push `obj` (protocol 3, no frames; their memo slots are never read)."""
    return pickle.dumps(obj, protocol=3)[2:-1]


def built_twice(call: Call) -> bytes:
    """`call` pickled (protocol 3), then its state applied a second time."""
    return pickle.dumps(call, protocol=3)[:-1] + state_ops(call.state) + b"b."


F8_STATE = (3, "<", None, None, None, -1, -1, 0)


@pytest.mark.parametrize("code", ["O8", "V4", "U3", "S2", "c8", "f16", "M8", "f8 ", "<f8", 8])
def test_refuses_numpy_dtypes_other_than_plain_numbers(tmp_path, marker, code):
    path = fx.write_pickle(tmp_path / "dtype.pkl", {"ema": Call(np.dtype, code, False, True)})
    refused(path, "refused the numpy dtype .*only plain numeric dtypes")


def test_refuses_an_object_array(tmp_path, marker):
    # Its objects would be built after the dtype: the dtype already stops the file.
    objects = np.array([1, Call(os.system, f"touch {marker}")], dtype=object)
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"ema": objects}, protocol=4))
    refused(path, "refused the numpy dtype 'O8'")


@pytest.mark.parametrize("state, message", [
    ((3, "<", None, None, None, 8, 8, 0), "not the one numpy writes"),
    ((3, "|", None, None, None, -1, -1, 0), "not the one numpy writes"),
    ((4, "<", None, None, None, -1, -1, 0, ({}, (b"s", 1, 1, 1))), "not the one numpy writes"),
    ((3, "<", None, ("a",), {"a": (1, 0)}, -1, -1, 0), "not the one numpy writes"),
    ((3, "<", None, None, None, -1, -1, False), "not the one numpy writes"),
    ((3, "<", None, None, None, -1.0, -1, 0), "not the one numpy writes"),
    ([3, "<", None, None, None, -1, -1, 0], "not the one numpy writes"),
    ({"names": None}, "not the one numpy writes"),
])
def test_refuses_a_numpy_dtype_state_other_than_numpys(tmp_path, marker, state, message):
    path = fx.write_pickle(tmp_path / "dtype.pkl", {"ema": Call(np.dtype, "f8", False, True, state=state)})
    refused(path, message)


def test_refuses_numpy_records_built_twice_or_oddly(tmp_path, marker):
    path = tmp_path / "twice.pkl"
    path.write_bytes(built_twice(Call(np.dtype, "f8", False, True, state=F8_STATE)))
    refused(path, "state of the numpy dtype 'f8' twice")
    array_state = (1, (2,), np.dtype("f4"), False, b"\x00" * 8)
    path.write_bytes(built_twice(Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=array_state)))
    refused(path, "state of a numpy array twice")
    refused(fx.write_pickle(tmp_path / "align.pkl", {"ema": Call(np.dtype, "f8", True, True)}), "align=True")


@pytest.mark.parametrize("args, message", [
    ((np.dtype("f8"), b"\x00" * 4), r"1 'f8' values has 4 bytes, not 8"),
    ((np.dtype("f2"), b"\x00" * 8), r"1 'f2' values has 8 bytes, not 2"),
    ((np.dtype("f8"), "\x00" * 8), "data is a str, not bytes"),
    (("f8", b"\x00" * 8), "has the dtype str, not a numpy dtype"),
    ((Call(np.dtype, "f8", False, True), b"\x00" * 8), "used before its state is set"),
    ((np.dtype("O"),), "refused the numpy dtype 'O8'"),
])
def test_refuses_malformed_numpy_scalars(tmp_path, marker, args, message):
    refused(fx.write_pickle(tmp_path / "scalar.pkl", {"ema": Call(NUMPY_SCALAR, *args)}), message)


@pytest.mark.parametrize("call, message", [
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (1,), b"b"), r"not from \(numpy.ndarray, \(0,\), b'b'\)"),
    (Call(NUMPY_RECONSTRUCT, collections.OrderedDict, (0,), b"b"), "not from"),
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (4,), np.dtype("f4"), False)),
     "a state other than numpy's"),
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (4,), np.dtype("f4"), False, b"\x00" * 12)),
     "4 'f4' values has 12 bytes, not 16"),
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (-4,), np.dtype("f4"), False, b"")),
     "malformed shape"),
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (2,), np.dtype("f4"), 0, b"\x00" * 8)),
     "a state other than numpy's"),
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (2,), "f4", False, b"\x00" * 8)),
     "a state other than numpy's"),
    (Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b"), "never receives its data"),
    (Call(NUMPY_FROMBUFFER, b"\x00" * 8, np.dtype("f4"), (2,), "K"), "read from a buffer"),
    (Call(NUMPY_FROMBUFFER, b"\x00" * 8, np.dtype("f4"), (3,), "C"), "3 'f4' values has 8 bytes, not 12"),
])
def test_refuses_malformed_numpy_arrays(tmp_path, marker, call, message):
    refused(fx.write_pickle(tmp_path / "array.pkl", {"ema": call}), message)


def test_refuses_large_numpy_arrays(tmp_path):
    path = fx.write_pickle(tmp_path / "large.pkl", {"ema": np.zeros(MAX_ARRAY_ELEMENTS + 1, np.float32)})
    refused(path, rf"has {MAX_ARRAY_ELEMENTS + 1} elements; .* at most {MAX_ARRAY_ELEMENTS} are read")
    # Shape times itemsize, not the data's length, decides.
    lie = Call(NUMPY_RECONSTRUCT, np.ndarray, (0,), b"b", state=(1, (10 ** 9, 10 ** 9), np.dtype("u1"), False, b""))
    refused(fx.write_pickle(tmp_path / "lie.pkl", {"ema": lie}), r"has 1000000000000000000 elements")


@pytest.mark.parametrize("function, message", [
    ("scalar", "'float' object is not callable"),  # numpy.core.multiarray.scalar(...)(payload)
    ("dtype", "'_NumpyDtype' object is not callable"),  # numpy.dtype("f8", False, True)(payload)
    ("ndarray", "'_Marker' object is not callable"),
    ("easydict", "dictionary update sequence"),  # dict(payload)
])
def test_refuses_a_stand_in_used_as_a_function(tmp_path, marker, function, message):
    payload = f"touch {marker}"
    calls = {"scalar": Call(CallableAs(NUMPY_SCALAR, np.dtype("f8"), b"\x00" * 8), payload),
             "dtype": Call(CallableAs(np.dtype, "f8", False, True), payload),
             "ndarray": Call(np.ndarray, payload), "easydict": Call(fx.EasyDict, payload)}
    path = fx.write_pickle(tmp_path / "call.pkl", {"ema": calls[function]})
    refused(path, f"not a readable EDM network pickle .*{message}")


@pytest.mark.parametrize("call, message", [
    (Call(codecs.encode, "abc", "utf-8"), r"_codecs.encode is called other than"),
    (Call(set, "abc"), "a set is made from a str, not a list"),
    (Call(bytes, [1, 2]), "not a readable EDM network pickle"),
])
def test_refuses_odd_calls_of_protocol_2_stand_ins(tmp_path, marker, call, message):
    refused(fx.write_pickle(tmp_path / "odd.pkl", {"ema": call}), message)


@pytest.mark.parametrize("value, message", [
    (np.dtype("f8"), r"leaves numpy dtype <f8"),
    (torch.storage._load_from_bytes, "leaves the function _storage_from_bytes"),
    (np.ndarray, r"leaves numpy.ndarray"),
    (six_element_storage(), "leaves .*_StorageRecord"),
    ({fx.EasyDict: 1}, "uses .* as a dict key"),
])
def test_refuses_stand_ins_left_in_the_data(tmp_path, value, message):
    refused(fx.write_pickle(tmp_path / "left.pkl", {"ema": value}), message)


def test_refuses_deep_nesting(tmp_path):
    nested = []
    for _ in range(300):
        nested = [nested]
    refused(fx.write_pickle(tmp_path / "deep.pkl", {"ema": nested}), "more than 200 levels deep")


# --- Files that are harmless but not a usable EDM network. ---

def test_refuses_a_missing_key(tmp_path):
    path = write_case(tmp_path / "net.pkl", case_network("edm", "adm", True))
    with pytest.raises(CheckpointError, match=r"no key 'net'; the pickle holds \['augment_pipe', 'dataset_kwargs'"):
        load_edm_network(path, key="net")
    with pytest.raises(CheckpointError, match="'loss_fn' is an unknown class 'EDMLoss'"):
        load_edm_network(path, key="loss_fn")
    with pytest.raises(CheckpointError, match="'dataset_kwargs' holds a dict, not a persistent EDM network"):
        load_edm_network(path, key="dataset_kwargs")


def network_state(net: torch.nn.Module) -> dict:
    """The state a snapshot records for `net` (its `__dict__` as EDM's persistence pickles it)."""
    ema = fx.edm_snapshot(net)["ema"]
    return {name: value for name, value in ema.__dict__.items() if name != "init_kwargs"}


def test_refuses_states_that_are_not_modules(tmp_path):
    path = fx.write_pickle(tmp_path / "flat.pkl", {"ema": fx.Persistent("EDMPrecond", {"x": 1})})
    with pytest.raises(CheckpointError, match="does not have the state of a torch module"):
        load_edm_network(path)
    state = network_state(case_network("edm", "adm", True))
    state["_parameters"] = {"weight": "not a tensor"}
    path = fx.write_pickle(tmp_path / "string.pkl", {"ema": fx.Persistent("EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="weight is a str, not a tensor"):
        load_edm_network(path)
    path = fx.write_pickle(tmp_path / "type.pkl", {"ema": fx.Persistent("EDMPrecond", {}, type="function")})
    with pytest.raises(CheckpointError, match="lacks its type 'class'"):
        load_edm_network(path)


def test_refuses_unrecorded_or_mismatched_arguments(tmp_path):
    original = case_network("edm", "adm", True)
    state = network_state(original)
    del state["_init_kwargs"]
    path = fx.write_pickle(tmp_path / "noargs.pkl", {"ema": fx.Persistent("EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="does not record its constructor arguments"):
        load_edm_network(path)

    state = network_state(original)
    state["_init_kwargs"] = {**state["_init_kwargs"], "model_channels": 64}
    path = fx.write_pickle(tmp_path / "wide.pkl", {"ema": fx.Persistent("EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_edm_network(path)

    state = network_state(original)
    state["_init_kwargs"] = {**state["_init_kwargs"], "model_type": "SongUNet"}
    path = fx.write_pickle(tmp_path / "type.pkl", {"ema": fx.Persistent("EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="build a SongUNet, but the file holds a DhariwalUNet"):
        load_edm_network(path)

    state = network_state(original)
    state["_init_kwargs"] = {**state["_init_kwargs"], "dropout": six_element_storage()}
    path = fx.write_pickle(tmp_path / "object.pkl", {"ema": fx.Persistent("EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="leaves .*_StorageRecord"):
        load_edm_network(path)


def test_refuses_non_finite_weights(tmp_path):
    original = case_network("edm", "adm", True)
    with torch.no_grad():
        original.model.out_conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'model.out_conv.weight' holds NaN"):
        load_edm_network(write_case(tmp_path / "nan.pkl", original))


def test_refuses_damaged_files(tmp_path):
    path = write_case(tmp_path / "net.pkl", case_network("edm", "adm", True))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pkl: not a readable EDM network pickle"):
        load_edm_network(truncated)
    with pytest.raises(CheckpointError, match="no such file"):
        load_edm_network(tmp_path / "absent.pkl")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_edm_network(fx.write_pickle(tmp_path / "list.pkl", [1, 2]))


def stack_global(module: str, name: str) -> bytes:
    """Pickle opcodes (protocol 4) that push the global `module.name`."""
    return b"".join(b"\x8c" + bytes([len(part)]) + part.encode() for part in (module, name)) + b"\x93"


@pytest.mark.parametrize("module, name, message", [
    ("torch.storage", "_load_from_bytes", "set attributes of a function"),
    (NUMPY_CORE, "scalar", "set attributes of a function"),
    ("numpy", "dtype", "set attributes of a function"),
    ("_codecs", "encode", "set attributes of a function"),
    ("numpy", "ndarray", "set attributes of numpy.ndarray"),
    ("torch.nn.modules.container", "ModuleDict", "not a readable EDM network pickle"),
    ("collections", "OrderedDict", "not a readable EDM network pickle"),
    ("dnnlib.util", "EasyDict", "not a readable EDM network pickle"),
])
def test_refuses_setting_attributes_of_allowed_globals(tmp_path, module, name, message):
    # PROTO 4, the global, state {"x": 1}, BUILD, STOP: an attempt to alter the stand-in itself.
    raw = b"\x80\x04" + stack_global(module, name) + b"}\x8c\x01xK\x01sb."
    path = tmp_path / "build.pkl"
    path.write_bytes(raw)
    refused(path, message)
    good = write_case(tmp_path / "net.pkl", case_network("edm", "adm", True))
    assert isinstance(load_edm_network(good), edm_networks.EDMPrecond)


def test_refuses_a_module_cycle(tmp_path):
    data = fx.edm_snapshot(case_network("edm", "adm", True))
    enc = data["ema"].model.enc
    enc._modules["loop"] = enc
    with pytest.raises(CheckpointError, match="module 'model.enc.loop' appears more than once"):
        load_edm_network(fx.write_pickle(tmp_path / "cycle.pkl", data))


# --- The full-size ImageNet-64 network. ---

@pytest.mark.slow
def test_full_size_imagenet64_adm_snapshot(tmp_path):
    """`edm-imagenet-64x64-cond-adm.pkl`'s architecture at full size, in EDM's snapshot format:
    296M parameters, about 1.2 GB; at most about 3 GB are held at a time."""
    torch.manual_seed(0)
    net = fx.perturb_(fx.build_edm_network("EDMPrecond", **fx.IMAGENET64_ADM), scale=0.01).eval()
    assert sum(p.numel() for p in net.parameters()) == fx.IMAGENET64_ADM_PARAMETERS
    x, labels = fx.inputs(batch=1, resolution=64, label_dim=1000)
    with torch.no_grad():
        expected = net(x, torch.tensor([2.5]), labels)
    digests = {name: hashlib.sha256(tensor.numpy()).hexdigest() for name, tensor in net.state_dict().items()}
    path = fx.write_edm_snapshot(tmp_path / "network-snapshot-imagenet64.pkl", net, copy_network=False,
                                 dataset=fx.dataset_kwargs(64, True, path="datasets/imagenet-64x64.zip",
                                                           max_size=1281167))
    del net
    gc.collect()

    info = describe_edm_pickle(path)
    assert (info["architecture"], info["resolution"], info["label_dim"], info["use_fp16"]) == \
        ("EDMPrecond(DhariwalUNet)", 64, 1000, True)
    assert info["parameters"] == fx.IMAGENET64_ADM_PARAMETERS
    assert info["dataset_kwargs"]["path"] == "datasets/imagenet-64x64.zip"

    loaded = load_edm_network(path)
    assert sum(p.numel() for p in loaded.parameters()) == fx.IMAGENET64_ADM_PARAMETERS
    assert {name: hashlib.sha256(t.numpy()).hexdigest() for name, t in loaded.state_dict().items()} == digests
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([2.5]), labels), expected)
