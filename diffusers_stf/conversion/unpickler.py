"""A restricted reader for NVlabs' training snapshots (EDM, EDM2): pickles made safe by reading them as plain data.

NVlabs pickles its networks with ``torch_utils.persistence``: every network module is a REDUCE of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` carries the source code of the defining
module (``module_src``), the class name and the module's ``__dict__`` (``state``). Unpickled with ``pickle.load``, that
source is executed. Here it is not: :class:`RestrictedUnpickler` resolves only the handful of globals a snapshot
contains, each to a safe stand-in, and returns nested :class:`ModuleRecord` s (class name, constructor arguments,
attributes, parameters and buffers) that layer 2 (:mod:`.nvlabs_edm`, :mod:`.nvlabs_edm2`) turns into this package's
models. ``module_src`` is kept as an inert string: it is never executed, nor compiled.

The globals a snapshot holds, and what each becomes:

============================================================  ======================================================
``torch_utils.persistence._reconstruct_persistent_obj``       a :class:`ModuleRecord` (``persistent=True``)
``torch._utils._rebuild_tensor_v2``                           a tensor viewing a storage read below (bounds checked)
``torch._utils._rebuild_parameter`` (``_with_state``)         that tensor
``torch.storage._load_from_bytes``                            ``torch.load(bytes, weights_only=True)``, on the CPU
``collections.OrderedDict``                                   itself (a builtin type: nothing to set on it)
``torch.nn.modules.container.ModuleDict``                     a :class:`ModuleRecord` (``persistent=False``)
``numpy.dtype``, ``numpy[._]core.multiarray.scalar``          a python number (numeric dtypes only)
``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``  a numpy array (numeric dtypes; EDM2's latent scale)
``dnnlib.util.EasyDict``                                      a dict (EDM2's top level)
============================================================  ======================================================

Anything else, and any persistent id, raises :class:`NVlabsPickleError` naming it. The stand-ins refuse the pickle
BUILD opcode (which could set attributes on them) except where a snapshot uses it, and a tensor's extent is checked
against its storage (``Tensor.set_`` itself does not check).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

PERSISTENT_GLOBAL = "torch_utils.persistence._reconstruct_persistent_obj"
MODULE_DICT_GLOBAL = "torch.nn.modules.container.ModuleDict"


class NVlabsPickleError(ValueError):
    """The file is not a snapshot this reader accepts; nothing in it was imported or executed."""


class _Frozen(type):
    """Metaclass of the stand-in classes: a pickle cannot set attributes on them (BUILD on a class)."""

    def __setattr__(cls, name, value):
        raise NVlabsPickleError(f"the pickle tried to set {name!r} on {cls.__name__}; refused")


def _check(condition: bool, message: str):
    if not condition:
        raise NVlabsPickleError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Layer 1's plain data


@dataclass(eq=False)
class ModuleRecord:
    """One pickled ``torch.nn.Module`` as plain data.

    Args:
        class_name: the class name as pickled: NVlabs' bare name for a persistent class (``'EDMPrecond'``,
            ``'SongUNet'``; NVlabs records the module only through ``module_src``), or the torch class path
            (``'torch.nn.modules.container.ModuleDict'``).
        persistent: True for a ``torch_utils.persistence`` object.
        module_src: the pickled source of the defining module (never executed); None for torch classes.
        version: ``torch_utils.persistence``'s format version (6 for EDM).
        init_args, init_kwargs: the constructor arguments NVlabs recorded (``_init_args``, ``_init_kwargs``).
        attributes: the other public entries of the module's ``__dict__`` (``training``, ``sigma_data``, …).
        parameters, buffers: the module's own tensors (None where the module registered None).
        modules: the child modules, in order.
        non_persistent_buffers: names of buffers that are not part of the state dict.
    """

    class_name: str
    persistent: bool
    module_src: Optional[str] = field(default=None, repr=False)
    version: Optional[int] = None
    init_args: Tuple = ()
    init_kwargs: Dict[str, Any] = field(default_factory=dict)
    attributes: Dict[str, Any] = field(default_factory=dict)
    parameters: Dict[str, Optional[torch.Tensor]] = field(default_factory=collections.OrderedDict, repr=False)
    buffers: Dict[str, Optional[torch.Tensor]] = field(default_factory=collections.OrderedDict, repr=False)
    modules: Dict[str, Optional["ModuleRecord"]] = field(default_factory=collections.OrderedDict, repr=False)
    non_persistent_buffers: frozenset = frozenset()

    def named_records(self, prefix: str = "", _path: Tuple[int, ...] = ()) -> Iterator[Tuple[str, "ModuleRecord"]]:
        """This record and every descendant, with dotted names (``''`` for this one). A module that contains itself
        (a pickle can build one) is refused."""
        _check(id(self) not in _path, f"the module tree contains itself at {prefix[:-1]!r}")
        yield prefix, self
        for name, child in self.modules.items():
            if child is not None:
                yield from child.named_records(f"{prefix}{name}.", (*_path, id(self)))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Parameters and persistent buffers of the whole tree by dotted name, as ``torch.nn.Module.state_dict``."""
        out = collections.OrderedDict()
        for prefix, record in self.named_records():
            for name, tensor in record.parameters.items():
                if tensor is not None:
                    out[prefix + name] = tensor
            for name, tensor in record.buffers.items():
                if tensor is not None and name not in record.non_persistent_buffers:
                    out[prefix + name] = tensor
        return out

    def describe(self) -> str:
        """``EDMPrecond(SongUNet)``: the class and, for a wrapper, the class of its network (EDM's ``model``,
        EDM2's ``unet``)."""
        child = self.modules.get("model", self.modules.get("unet"))
        return f"{self.class_name}({child.class_name})" if isinstance(child, ModuleRecord) else self.class_name

    def __setstate__(self, state):
        raise NVlabsPickleError("the pickle tried to BUILD a persistent object after its construction; refused")


def _record_from_state(class_name: str, state, persistent: bool, module_src=None, version=None) -> ModuleRecord:
    """A :class:`ModuleRecord` from a pickled module ``__dict__``, every entry type-checked."""
    _check(isinstance(state, dict), f"{class_name}: the pickled state is a {type(state).__name__}, not a dict")
    tensors = {}
    for key in ("_parameters", "_buffers"):
        entries = state.get(key, {})
        _check(isinstance(entries, dict), f"{class_name}.{key} is a {type(entries).__name__}, not a dict")
        for name, value in entries.items():
            _check(isinstance(name, str) and (value is None or type(value) is torch.Tensor),
                   f"{class_name}.{key}[{name!r}] is a {type(value).__name__}, not a tensor")
            _check(value is None or not value._backward_hooks, f"{class_name}.{key}[{name!r}] carries hooks; refused")
        tensors[key] = collections.OrderedDict(entries)
    modules = state.get("_modules", {})
    _check(isinstance(modules, dict), f"{class_name}._modules is a {type(modules).__name__}, not a dict")
    for name, child in modules.items():
        _check(isinstance(name, str) and (child is None or isinstance(child, ModuleRecord)),
               f"{class_name}._modules[{name!r}] is a {type(child).__name__}, not a pickled module")
    init_args, init_kwargs = state.get("_init_args") or (), state.get("_init_kwargs") or {}
    _check(isinstance(init_args, (tuple, list)) and isinstance(init_kwargs, dict),
           f"{class_name}: malformed constructor arguments (_init_args/_init_kwargs)")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    _check(isinstance(non_persistent, (set, frozenset)) and all(isinstance(n, str) for n in non_persistent),
           f"{class_name}._non_persistent_buffers_set is malformed")
    attributes = {k: _plain(v) for k, v in state.items() if isinstance(k, str) and not k.startswith("_")}
    return ModuleRecord(
        class_name=class_name, persistent=persistent, module_src=module_src, version=version,
        init_args=tuple(init_args), init_kwargs=dict(init_kwargs), attributes=attributes,
        parameters=tensors["_parameters"], buffers=tensors["_buffers"], modules=collections.OrderedDict(modules),
        non_persistent_buffers=frozenset(non_persistent),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The stand-ins for the allowed globals


class _Callable:
    """An allowed global that a pickle may call (REDUCE) and nothing else: no attributes, no BUILD."""

    __slots__ = ("_name", "_function")

    def __init__(self, name: str, function):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_function", function)

    def __call__(self, *args):
        return self._function(*args)

    def __setattr__(self, name, value):
        raise NVlabsPickleError(f"the pickle tried to set {name!r} on {self._name}; refused")

    def __setstate__(self, state):
        raise NVlabsPickleError(f"the pickle tried to BUILD {self._name}; refused")


def _reconstruct_persistent_obj(meta) -> ModuleRecord:
    """``torch_utils.persistence._reconstruct_persistent_obj``: the record of ``meta``, ``module_src`` kept as text."""
    _check(isinstance(meta, dict), f"{PERSISTENT_GLOBAL} got a {type(meta).__name__}, expected the meta dict")
    _check(meta.get("type") == "class", f"persistent object of type {meta.get('type')!r}; only 'class' is known")
    class_name, module_src = meta.get("class_name"), meta.get("module_src")
    _check(isinstance(class_name, str) and isinstance(module_src, str),
           "persistent object without class_name/module_src")
    version = meta.get("version")
    _check(version is None or isinstance(version, int), f"persistent object version {version!r} is not an int")
    return _record_from_state(class_name, meta.get("state"), True, module_src, version)


class _ModuleDict(ModuleRecord, metaclass=_Frozen):
    """``torch.nn.ModuleDict``: NEWOBJ makes an empty record, BUILD gives it the module ``__dict__`` once."""

    def __new__(cls, *args):
        _check(not args, "torch.nn.ModuleDict constructed with arguments; refused")
        record = super().__new__(cls)
        record.__dict__.update(ModuleRecord(MODULE_DICT_GLOBAL, persistent=False).__dict__, _built=False)
        return record

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        _check(not self.__dict__["_built"], "the pickle tried to BUILD a ModuleDict twice; refused")
        self.__dict__.update(_record_from_state(MODULE_DICT_GLOBAL, state, persistent=False).__dict__, _built=True)


class EasyDictRecord(dict, metaclass=_Frozen):
    """``dnnlib.util.EasyDict`` (a dict subclass; EDM2 snapshots' top level) as a plain dict of its items."""

    def __setstate__(self, state):
        _check(not state, "dnnlib.util.EasyDict with instance attributes; refused")


_DTYPE_CODE = re.compile(r"^[biufc]\d{1,2}$")


class _NumpyDType(metaclass=_Frozen):
    """``numpy.dtype(code, align, copy)`` of a numeric type; BUILD gives its byte order."""

    def __init__(self, code, align=False, copy=True):
        _check(isinstance(code, str) and bool(_DTYPE_CODE.match(code)), f"numpy dtype {code!r} is not a numeric type")
        self.__dict__.update(code=code, byteorder="=")

    def __setstate__(self, state):
        _check(isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="),
               f"malformed numpy dtype state {state!r}")
        self.__dict__["byteorder"] = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype if self.byteorder in ("|", "=") else dtype.newbyteorder(self.byteorder)


class NumpyArrayRecord(metaclass=_Frozen):
    """``numpy.ndarray`` as pickled (protocol <= 4): ``_reconstruct(ndarray, (0,), b'b')`` makes an empty one, BUILD
    gives it ``(1, shape, dtype, is_fortran, raw bytes)`` once. ``array`` is the value (None until built)."""

    def __init__(self):
        self.__dict__["array"] = None

    def __setstate__(self, state):
        _check(self.array is None, "the pickle tried to BUILD a numpy array twice; refused")
        _check(isinstance(state, tuple) and len(state) == 5 and state[0] == 1, "malformed numpy array state")
        _, shape, dtype, fortran, data = state
        _check(isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
               and isinstance(dtype, _NumpyDType) and isinstance(fortran, bool) and isinstance(data, bytes),
               "malformed numpy array state")
        np_dtype = dtype.numpy()
        _check(len(data) == math.prod(shape) * np_dtype.itemsize,
               f"a numpy array of shape {shape} and dtype {np_dtype} holds {len(data)} bytes")
        array = np.frombuffer(data, dtype=np_dtype).reshape(shape, order="F" if fortran else "C").copy()
        self.__dict__["array"] = array


def _numpy_reconstruct(cls, shape, typecode):
    """``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``: an empty array that BUILD fills."""
    _check(cls is _NDARRAY and shape == (0,) and typecode == b"b", "malformed numpy array reconstruction")
    return NumpyArrayRecord()


def _not_callable(*args):
    raise NVlabsPickleError("the pickle called numpy.ndarray directly; refused")


_NDARRAY = _Callable("numpy.ndarray", _not_callable)


def _plain(value):
    """A built numpy array record as its array; anything else as it is."""
    if isinstance(value, NumpyArrayRecord):
        _check(value.array is not None, "a numpy array was used before it was built")
        return value.array
    return value


def _numpy_scalar(dtype, data):
    """``numpy.core.multiarray.scalar(dtype, bytes)`` as a python number."""
    _check(isinstance(dtype, _NumpyDType) and isinstance(data, bytes), "malformed numpy scalar")
    np_dtype = dtype.numpy()
    _check(len(data) == np_dtype.itemsize, f"numpy scalar of {len(data)} bytes for dtype {np_dtype}")
    return np.frombuffer(data, dtype=np_dtype)[0].item()


# ---------------------------------------------------------------------------------------------------------------------
# The unpickler


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only a snapshot's globals (module docstring), each to a safe stand-in."""

    def __init__(self, file, source: str = "the pickle"):
        super().__init__(file)
        self.source = source
        # what was read here, kept alive so that an id is never reused: the only storages a tensor may view and the
        # only tensors a parameter may wrap
        self._storages: Dict[int, Any] = {}
        self._tensors: Dict[int, torch.Tensor] = {}
        self._globals = {
            PERSISTENT_GLOBAL: _Callable(PERSISTENT_GLOBAL, _reconstruct_persistent_obj),
            "torch._utils._rebuild_tensor_v2": _Callable("_rebuild_tensor_v2", self._rebuild_tensor),
            "torch._utils._rebuild_parameter": _Callable("_rebuild_parameter", self._rebuild_parameter),
            "torch._utils._rebuild_parameter_with_state": _Callable("_rebuild_parameter_with_state",
                                                                    self._rebuild_parameter),
            "torch.storage._load_from_bytes": _Callable("_load_from_bytes", self._load_storage),
            "collections.OrderedDict": collections.OrderedDict,
            MODULE_DICT_GLOBAL: _ModuleDict,
            "numpy.dtype": _NumpyDType,
            "numpy.core.multiarray.scalar": _Callable("scalar", _numpy_scalar),
            "numpy._core.multiarray.scalar": _Callable("scalar", _numpy_scalar),
            "numpy.core.multiarray._reconstruct": _Callable("_reconstruct", _numpy_reconstruct),
            "numpy._core.multiarray._reconstruct": _Callable("_reconstruct", _numpy_reconstruct),
            "numpy.ndarray": _NDARRAY,
            "dnnlib.util.EasyDict": EasyDictRecord,
        }

    def find_class(self, module: str, name: str):
        key = f"{module}.{name}"
        if key not in self._globals:
            raise NVlabsPickleError(
                f"{self.source} refers to the global {key!r}, which an NVlabs snapshot does not contain; refused. "
                "Nothing from the file was imported or executed."
            )
        return self._globals[key]

    def persistent_load(self, pid):
        raise NVlabsPickleError(f"{self.source} uses a persistent id ({pid!r:.80}); refused (snapshots have none)")

    def _load_storage(self, data):
        _check(isinstance(data, bytes), "torch.storage._load_from_bytes got no bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated, and is what the blob holds
            storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        _check(isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)), "a storage blob held no storage")
        self._storages[id(storage)] = storage
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
        """A tensor of ``size``/``stride`` at ``offset`` in ``storage``, which must be one read by this unpickler
        and must hold every element the view reaches."""
        _check(self._storages.get(id(storage)) is storage,
               "a tensor refers to a storage that was not read from the file")
        ints = (offset, *size, *stride)
        _check(all(type(v) is int and v >= 0 for v in ints) and len(size) == len(stride),
               f"malformed tensor geometry (offset {offset!r}, size {size!r}, stride {stride!r})")
        _check(not backward_hooks and not metadata and isinstance(requires_grad, bool),
               "a tensor carries hooks or metadata")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtype = storage.dtype
            untyped = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
        numel = untyped.nbytes() // dtype.itemsize
        if math.prod(size) > 0:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            _check(last < numel, f"a tensor of size {tuple(size)} reaches beyond its storage of {numel} elements")
        tensor = torch.empty((0,), dtype=dtype).set_(untyped, offset, tuple(size), tuple(stride))
        self._tensors[id(tensor)] = tensor
        return tensor

    def _rebuild_parameter(self, data, requires_grad, backward_hooks, state=None):
        _check(self._tensors.get(id(data)) is data,
               "a parameter wraps something that is not a tensor read from the file")
        _check(not backward_hooks and not state, "a parameter carries hooks or extra state; refused")
        return data

    def load(self):
        try:
            return super().load()
        except NVlabsPickleError:
            raise
        except (EOFError, pickle.UnpicklingError) as err:
            raise NVlabsPickleError(f"{self.source} is truncated or not a pickle ({err})") from None
        except (TypeError, AttributeError, ValueError, KeyError, IndexError, RuntimeError) as err:
            raise NVlabsPickleError(f"{self.source} is malformed: {type(err).__name__}: {err}") from None


def read_nvlabs_pickle(path: str):
    """The contents of an NVlabs pickle as plain data: dicts, lists, numbers, strings, tensors and
    :class:`ModuleRecord` s. Nothing from the file is imported or executed.

    Raises:
        NVlabsPickleError: a global or persistent id outside the snapshot format, a truncated or malformed file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=os.path.basename(path)).load()
