"""Loading EDM network pickles without running their code.

The pickles here are written in EDM's own format: a temporary `torch_utils/persistence.py`
implements EDM's persistent-class mechanism (the class's module source travels inside the
pickle and `pickle.load` executes it), and a temporary `training/networks.py` holds persistent
versions of our network classes. After writing, that code is unloaded, so `load_edm_network`
has only the file to go on.
"""
import copy
import hashlib
import importlib
import io
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from elucd_fast.models import edm_networks
from elucd_fast.models.checkpoint import CheckpointError, sha256_file
from elucd_fast.models.edm_pickle import describe_edm_pickle, load_edm_network
from test_edm_networks import build, inputs

# EDM's torch_utils/persistence.py, reduced to what writes and reads the pickle format.
PERSISTENCE_SOURCE = '''\
import copy
import inspect
import sys
import types
import uuid

_version = 6
_decorators = set()
_module_to_src_dict = {}
_src_to_module_dict = {}


def persistent_class(orig_class):
    if orig_class in _decorators:
        return orig_class
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator


def _reconstruct_persistent_obj(meta):
    module = _src_to_module(meta["module_src"])
    decorator_class = persistent_class(module.__dict__[meta["class_name"]])
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(meta["state"])
    else:
        obj.__dict__.update(meta["state"])
    return obj


def _module_to_src(module):
    src = _module_to_src_dict.get(module)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src):
    module = _src_to_module_dict.get(src)
    if module is None:
        module_name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)
    return module
'''

# Appended to our networks module: EDM decorates every network class of training/networks.py.
PERSISTENT_CLASSES = '''

from torch_utils import persistence as _persistence

for _name in sorted(NETWORK_CLASS_NAMES):
    globals()[_name] = _persistence.persistent_class(globals()[_name])
'''

LOSS_SOURCE = '''\
from torch_utils import persistence


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
'''


class EdmCode:
    """EDM's code layout under `root`, importable until `unload()`."""

    PACKAGES = ("torch_utils", "training")

    def __init__(self, root: Path):
        self.root = root
        files = {
            "torch_utils/__init__.py": "",
            "torch_utils/persistence.py": PERSISTENCE_SOURCE,
            "training/__init__.py": "",
            "training/networks.py": Path(edm_networks.__file__).read_text() + PERSISTENT_CLASSES,
            "training/loss.py": LOSS_SOURCE,
        }
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)

    def forget_modules(self) -> None:
        """Drops the imported EDM code, and the modules `pickle.load` made from pickled sources."""
        for name in list(sys.modules):
            if name.split(".")[0] in self.PACKAGES or name.startswith("_imported_module_"):
                del sys.modules[name]

    def unload(self) -> None:
        self.forget_modules()
        if str(self.root) in sys.path:
            sys.path.remove(str(self.root))


@pytest.fixture
def edm_code(tmp_path):
    code = EdmCode(tmp_path / "edm_code")
    yield code
    code.unload()


@pytest.fixture
def marker(tmp_path):
    """A file that only running code from a pickle would create."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "code from the pickle ran"


def write_edm_pickle(path: Path, edm_code: EdmCode, ema: object, **data: object) -> Path:
    """`path` written as EDM's training loop writes its snapshots."""
    loss_fn = edm_code.module("training.loss").EDMLoss()
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip",
                                    use_labels=True, xflip=False, cache=True, resolution=16, max_size=100), **data)
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


class Call:
    """Pickles as `function(*args)`, then BUILD with `state` when given."""

    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def write_raw_pickle(path: Path, data: object) -> Path:
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


@pytest.mark.parametrize("case", ["edm-adm", "vp-ddpmpp", "ve-ncsnpp"])
def test_loaded_network_matches_the_pickled_one(tmp_path, edm_code, case):
    networks = edm_code.module("training.networks")
    original = build(networks, case)
    assert type(original).__module__ == "training.networks"  # the persistent version was built
    path = write_edm_pickle(tmp_path / "network-snapshot.pkl", edm_code, original)

    # An ordinary load imports torch_utils and executes the network source stored in the file.
    edm_code.forget_modules()
    with open(path, "rb") as f:
        unsafe = pickle.load(f)
    assert type(unsafe["ema"]).__module__.startswith("_imported_module_")

    edm_code.unload()
    net = load_edm_network(path)
    assert "torch_utils" not in sys.modules and "training" not in sys.modules
    assert type(net) is getattr(edm_networks, type(original).__name__)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, labels = inputs()
    with torch.no_grad():
        for sigma in (0.02, 0.7, torch.tensor([0.5, 20.0])):
            expected = original(x, sigma, labels)
            assert torch.equal(net(x, sigma, labels), expected)
            assert torch.equal(unsafe["ema"](x, sigma, labels), expected)


def test_load_keeps_recorded_arguments(tmp_path, edm_code):
    networks = edm_code.module("training.networks")
    original = build(networks, "iddpm-adm", use_fp16=True)
    path = write_edm_pickle(tmp_path / "net.pkl", edm_code, original)
    edm_code.unload()
    net = load_edm_network(path, device="cpu")
    assert net.use_fp16 is True and net.img_resolution == 16 and net.label_dim == 10
    assert net.init_kwargs == original.init_kwargs
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, 3.0, labels), original(x, 3.0, labels))


def test_load_leaves_the_global_random_stream_alone(tmp_path, edm_code):
    path = write_edm_pickle(tmp_path / "net.pkl", edm_code, build(edm_code.module("training.networks"), "edm-adm"))
    edm_code.unload()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_edm_network(path)
    assert torch.equal(torch.rand(3), expected)


def test_describe(tmp_path, edm_code):
    networks = edm_code.module("training.networks")
    original = build(networks, "edm-adm")
    source = Path(networks.__file__).read_text()
    path = write_edm_pickle(tmp_path / "net.pkl", edm_code, original)
    edm_code.unload()
    info = describe_edm_pickle(path)
    assert info == {
        "kind": "edm-network-pickle",
        "architecture": "EDMPrecond(DhariwalUNet)",
        "resolution": 16,
        "channels": 3,
        "label_dim": 10,
        "use_fp16": False,
        "parameters": sum(p.numel() for p in original.parameters()),
        "dtype": "float32",
        "sha256": sha256_file(path),
        "module_src_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "keys": ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"],
    }
    assert "training" not in sys.modules


# --- Files that must be refused, with nothing from them executed. ---

@pytest.mark.parametrize("function", [os.system, "exec"])
def test_refuses_a_reduce_payload(tmp_path, marker, function):
    if function == "exec":
        payload = Call(exec, f"open({str(marker)!r}, 'w').close()")
    else:
        payload = Call(function, f"touch {marker}")
    path = write_raw_pickle(tmp_path / "evil.pkl", {"ema": payload})
    expected = "builtins.exec" if function == "exec" else f"{os.system.__module__}.system"
    with pytest.raises(CheckpointError, match=rf"evil\.pkl: refused the global {expected}"):
        load_edm_network(path)
    with pytest.raises(CheckpointError, match="refused the global"):
        describe_edm_pickle(path)


def persistent_call(edm_code: EdmCode, module_src: str, class_name: str, state: object) -> Call:
    reconstruct = edm_code.module("torch_utils.persistence")._reconstruct_persistent_obj
    return Call(reconstruct, dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state))


def test_never_runs_module_source(tmp_path, edm_code, marker):
    evil_src = f"open({str(marker)!r}, 'w').close()\n"
    path = write_raw_pickle(tmp_path / "evil.pkl", {"ema": persistent_call(edm_code, evil_src, "Payload", {})})
    with pytest.raises(CheckpointError, match="unknown class 'Payload'"):
        load_edm_network(path)

    # The same source on a real network: the file loads, the source still never runs.
    original = build(edm_code.module("training.networks"), "edm-adm")
    state = copy.deepcopy(original).requires_grad_(False).__getstate__()
    path = write_raw_pickle(tmp_path / "evil-net.pkl",
                            {"ema": persistent_call(edm_code, evil_src, "EDMPrecond", state)})
    net = load_edm_network(path)
    assert not marker.exists()
    x, labels = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, 1.0, labels), original(x, 1.0, labels))

    # Proof that the payload is live: an ordinary load runs it.
    edm_code.forget_modules()
    with open(path, "rb") as f, pytest.raises(KeyError):
        pickle.load(f)
    assert marker.exists()
    marker.unlink()


def test_refuses_a_payload_inside_a_tensor_blob(tmp_path, marker):
    blob = io.BytesIO()
    torch.save(Call(os.system, f"touch {marker}"), blob, _use_new_zipfile_serialization=False)
    path = write_raw_pickle(tmp_path / "evil.pkl", {"ema": Call(torch.storage._load_from_bytes, blob.getvalue())})
    with pytest.raises(CheckpointError, match="refused a nested tensor blob"):
        load_edm_network(path)


def six_element_storage() -> object:
    # The storage a tensor pickles with: a nested torch.save blob behind _load_from_bytes.
    return torch.arange(6.0).__reduce_ex__(2)[1][0]


@pytest.mark.parametrize("offset, size, stride", [(0, (1000,), (1,)), (5, (2,), (1,)), (0, (2, 3), (4, 1)),
                                                  (-1, (2,), (1,))])
def test_refuses_a_tensor_larger_than_its_storage(tmp_path, offset, size, stride):
    tensor = Call(torch._utils._rebuild_tensor_v2, six_element_storage(), offset, size, stride, False, OrderedDict())
    path = write_raw_pickle(tmp_path / "lie.pkl", {"ema": tensor})
    message = "malformed layout" if offset < 0 else "tensor claims more data than its storage holds"
    with pytest.raises(CheckpointError, match=message):
        load_edm_network(path)


def test_refuses_resetting_a_tensor_past_its_storage(tmp_path):
    storage = six_element_storage()
    tensor = Call(torch._utils._rebuild_tensor_v2, storage, 0, (6,), (1,), False, OrderedDict(),
                  state=(storage, 0, (1000,), (1,)))
    path = write_raw_pickle(tmp_path / "lie.pkl", {"ema": tensor})
    with pytest.raises(CheckpointError, match="set the state of a tensor"):
        load_edm_network(path)


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
    path = write_raw_pickle(tmp_path / "unknown.pkl", {"ema": instance})
    with pytest.raises(CheckpointError, match=r"unknown\.pkl: refused the global some_module\.SomeClass"):
        load_edm_network(path)


# --- Files that are harmless but not a usable EDM network. ---

def test_refuses_a_missing_key(tmp_path, edm_code):
    path = write_edm_pickle(tmp_path / "net.pkl", edm_code, build(edm_code.module("training.networks"), "edm-adm"))
    with pytest.raises(CheckpointError, match=r"no key 'net'; the pickle holds \['augment_pipe', 'dataset_kwargs'"):
        load_edm_network(path, key="net")
    with pytest.raises(CheckpointError, match="'loss_fn' is an unknown class 'EDMLoss'"):
        load_edm_network(path, key="loss_fn")
    with pytest.raises(CheckpointError, match="'dataset_kwargs' holds a dict, not a persistent EDM network"):
        load_edm_network(path, key="dataset_kwargs")


def test_refuses_states_that_are_not_modules(tmp_path, edm_code):
    path = write_raw_pickle(tmp_path / "flat.pkl", {"ema": persistent_call(edm_code, "", "EDMPrecond", {"x": 1})})
    with pytest.raises(CheckpointError, match="does not have the state of a torch module"):
        load_edm_network(path)
    original = build(edm_code.module("training.networks"), "edm-adm")
    state = copy.deepcopy(original).__getstate__()
    state["_parameters"] = {"weight": "not a tensor"}
    path = write_raw_pickle(tmp_path / "string.pkl", {"ema": persistent_call(edm_code, "", "EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="weight is a str, not a tensor"):
        load_edm_network(path)


def test_refuses_unrecorded_or_mismatched_arguments(tmp_path, edm_code):
    original = build(edm_code.module("training.networks"), "edm-adm")
    state = copy.deepcopy(original).__getstate__()
    del state["_init_kwargs"]
    path = write_raw_pickle(tmp_path / "noargs.pkl", {"ema": persistent_call(edm_code, "", "EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="does not record its constructor arguments"):
        load_edm_network(path)

    state = copy.deepcopy(original).__getstate__()
    state["_init_kwargs"] = {**state["_init_kwargs"], "model_channels": 64}
    path = write_raw_pickle(tmp_path / "wide.pkl", {"ema": persistent_call(edm_code, "", "EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_edm_network(path)

    state = copy.deepcopy(original).__getstate__()
    state["_init_kwargs"] = {**state["_init_kwargs"], "model_type": "SongUNet"}
    path = write_raw_pickle(tmp_path / "type.pkl", {"ema": persistent_call(edm_code, "", "EDMPrecond", state)})
    with pytest.raises(CheckpointError, match="build a SongUNet, but the file holds a DhariwalUNet"):
        load_edm_network(path)


def test_refuses_non_finite_weights(tmp_path, edm_code):
    original = build(edm_code.module("training.networks"), "edm-adm")
    with torch.no_grad():
        original.model.out_conv.weight[0, 0, 0, 0] = float("nan")
    path = write_edm_pickle(tmp_path / "nan.pkl", edm_code, original)
    with pytest.raises(CheckpointError, match="'model.out_conv.weight' holds NaN"):
        load_edm_network(path)


def test_refuses_damaged_files(tmp_path, edm_code):
    path = write_edm_pickle(tmp_path / "net.pkl", edm_code, build(edm_code.module("training.networks"), "edm-adm"))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pkl: not a readable EDM network pickle"):
        load_edm_network(truncated)
    with pytest.raises(CheckpointError, match="no such file"):
        load_edm_network(tmp_path / "absent.pkl")
    listing = write_raw_pickle(tmp_path / "list.pkl", [1, 2])
    with pytest.raises(CheckpointError, match="holds a list"):
        load_edm_network(listing)


def stack_global(module: str, name: str) -> bytes:
    """Pickle opcodes (protocol 4) that push the global `module.name`."""
    return b"".join(b"\x8c" + bytes([len(part)]) + part.encode() for part in (module, name)) + b"\x93"


@pytest.mark.parametrize("module, name, message", [
    ("torch.storage", "_load_from_bytes", "set attributes of a function"),
    ("torch.nn.modules.container", "ModuleDict", "not a readable EDM network pickle"),
    ("collections", "OrderedDict", "not a readable EDM network pickle"),
])
def test_refuses_setting_attributes_of_allowed_globals(tmp_path, edm_code, module, name, message):
    # PROTO 4, the global, state {"x": 1}, BUILD, STOP: an attempt to alter the stand-in itself.
    raw = b"\x80\x04" + stack_global(module, name) + b"}\x8c\x01xK\x01sb."
    path = tmp_path / "build.pkl"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=message):
        load_edm_network(path)
    good = write_edm_pickle(tmp_path / "net.pkl", edm_code, build(edm_code.module("training.networks"), "edm-adm"))
    assert isinstance(load_edm_network(good), edm_networks.EDMPrecond)


def test_refuses_a_module_cycle(tmp_path):
    from elucd_fast.models.edm_pickle import PersistentRecord, _network_tensors
    state = {"_parameters": {}, "_buffers": {}, "_modules": {}}
    record = PersistentRecord("EDMPrecond", 6, "0" * 64, state)
    state["_modules"]["model"] = record
    with pytest.raises(CheckpointError, match="'model' appears more than once"):
        _network_tensors(record, tmp_path / "cycle.pkl")
