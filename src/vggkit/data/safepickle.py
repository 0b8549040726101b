"""A restricted unpickler for the CIFAR "python version" batch files.

Those files are Python 2 pickles of a dict holding a numpy uint8 array, lists of ints and strings.
Plain ``pickle.load`` on a downloaded file would run whatever callable the file names, so this
unpickler admits only the globals those files need, and even those are replaced by inert
stand-ins: numpy's array/dtype reconstruction yields a ``_ArrayStub``/``_DtypeStub`` that merely
records its arguments. After unpickling, the stubs are validated (numeric dtype, shape consistent
with the byte count) and only then turned into real arrays with ``np.frombuffer``, so no numpy
code ever runs on unchecked state. Any other global, persistent id or malformed stream raises
``pickle.UnpicklingError`` before anything is called.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import reprlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

# Dtype strings the stubs accept: plain numeric scalars, optionally with a byte-order prefix.
_DTYPE_RE = re.compile(r"^[<>|=]?(b1|u1|i1|u2|i2|u4|i4|u8|i8|f4|f8|\?|b|B|h|H|i|I|l|L|q|Q|f|d)$")
MAX_ELEMENTS = 1 << 34  # far above any real batch; stops absurd shapes before any allocation
MAX_DEPTH = 50  # container nesting; a CIFAR batch nests 3 deep
# Error messages show values through reprlib: bounded in depth and length, whatever the file holds.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40
_short_repr = _REPR.repr


class _DtypeStub:
    """Stands in for ``numpy.dtype(obj, align, copy)`` until validated."""

    def __init__(self, obj: Any = None, align: Any = False, copy: Any = False, *rest: Any) -> None:
        if rest:
            raise pickle.UnpicklingError("numpy.dtype called with unexpected arguments")
        if isinstance(obj, bytes):
            obj = obj.decode("latin1")
        if not isinstance(obj, str) or not _DTYPE_RE.match(obj):
            raise pickle.UnpicklingError(f"dtype {_short_repr(obj)} is not a plain numeric type")
        self.spec = obj
        self.byteorder = "|"

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 8:
            raise pickle.UnpicklingError("malformed dtype state")
        byteorder = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if byteorder not in ("|", "<", ">", "=") or any(s is not None for s in state[2:5]):
            raise pickle.UnpicklingError("dtype state with fields or sub-arrays is not allowed")
        self.byteorder = byteorder

    def to_dtype(self) -> np.dtype:
        dt = np.dtype(self.spec)
        if self.byteorder in ("<", ">"):
            dt = dt.newbyteorder(self.byteorder)
        return dt


class _ArrayStub:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)``."""

    def __init__(self, subtype: Any = None, shape: Any = None, typecode: Any = None) -> None:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("only plain numpy arrays are allowed")
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_array(self) -> np.ndarray:
        state = self.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed array state")
        shape, dtype, fortran, data = state[-4:]
        return _build(shape, dtype, "F" if fortran else "C", data)


class _FrombufferStub:
    """Stands in for numpy's protocol-5 ``_frombuffer(buffer, dtype, shape, order)``."""

    def __init__(self, buf: Any = None, dtype: Any = None, shape: Any = None, order: Any = "C") -> None:
        self.args = (shape, dtype, order, buf)

    def to_array(self) -> np.ndarray:
        shape, dtype, order, buf = self.args
        return _build(shape, dtype, order, buf)


class _NdarrayMarker:
    """What the pickle gets for ``numpy.ndarray``: usable only as _reconstruct's first argument."""

    __slots__ = ()


_NDARRAY = _NdarrayMarker()


def _build(shape: Any, dtype: Any, order: Any, data: Any) -> np.ndarray:
    """Validate the recorded pieces of an array and assemble it from its bytes."""
    if not isinstance(dtype, _DtypeStub):
        raise pickle.UnpicklingError("array dtype is not a plain numpy dtype")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise pickle.UnpicklingError(f"malformed array shape {_short_repr(shape)}")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"malformed array order {_short_repr(order)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"array shape {shape} is implausibly large")
    if isinstance(data, str):  # Python 2 str read with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("array data is not a byte string")
    dt = dtype.to_dtype()
    if len(data) != count * dt.itemsize:
        raise pickle.UnpicklingError(
            f"array data holds {len(data)} bytes but shape {shape} of {dt} needs {count * dt.itemsize}"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape, order=order)


def _latin1_encode(obj: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    """Python 3 pickles of bytes at protocol 2 call ``_codecs.encode(str, 'latin1')``; only that."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 text")
    return obj.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy.core.numeric", "_frombuffer"): _FrombufferStub,
    ("numpy._core.numeric", "_frombuffer"): _FrombufferStub,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,
}


_STUB_CALLABLES = (_ArrayStub, _DtypeStub, _FrombufferStub, _latin1_encode)
_KEY_TYPES = (str, bytes, int)
_CONTAINERS = (list, tuple, dict)
_MUTABLE = (list, dict)


def _refuse(what: str):  # type: ignore[no-untyped-def]
    def load(self: RestrictedUnpickler) -> None:
        raise pickle.UnpicklingError(f"{what} is not allowed in a dataset file")

    return load


def _tuple_of(count: int):  # type: ignore[no-untyped-def]
    """The TUPLE1/2/3 handler: the top ``count`` items become a tuple."""

    def load(self: RestrictedUnpickler) -> None:
        items = self._pop_top(count)
        self._push_new(tuple(items), self._depth_holding(items))

    return load


def _too_deep() -> pickle.UnpicklingError:
    return pickle.UnpicklingError(
        f"containers nested deeper than {MAX_DEPTH} levels are not allowed in a dataset file")


def _check_keys(keys: Sequence[Any]) -> None:
    # Hashing a nested tuple recurses in C without a depth check: a deep one crashes CPython.
    if not all(isinstance(k, _KEY_TYPES) for k in keys):
        raise pickle.UnpicklingError("dict keys must be strings or integers")


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Admits only the globals in ``_ALLOWED`` (inert stand-ins), nothing else.

    Built on the pure-Python unpickler on purpose: the C one pre-allocates whatever a corrupt
    length or memo index asks for (a flipped byte can demand tens of GB), while this one keeps
    its memo in a dict and (with BYTEARRAY8 overridden) reads only the bytes that exist. It also lets us police opcodes:
    BUILD only on the stubs, REDUCE only on the allowed callables, dict keys only str/bytes/int
    on every opcode that fills a dict (so hashing can never recurse through a nested key), no
    sets, object-creation opcodes, extension registry or out-of-band buffers, and every opcode
    that builds or fills a list, tuple or dict tracks its nesting depth (at most ``MAX_DEPTH``).
    A list or dict may be filled only before it is put into another container, which is how
    the pickler writes acyclic data; so cycles, and depth gained behind the tracking's back by
    filling an already nested container, are refused too.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # By id(): every list/tuple/dict on the stack is made by an opcode below, which
        # (re)sets its entries, so an id reused after a free never inherits a stale depth.
        self._depths: dict[int, int] = {}
        self._nested: set[int] = set()  # lists and dicts already inside another container

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a dataset file")

    # --- nesting depth

    def _depth_holding(self, children: Sequence[Any]) -> int:
        """Depth of a container holding ``children``; marks the lists and dicts among them nested."""
        deepest = 0
        for child in children:
            if type(child) in _CONTAINERS:
                deepest = max(deepest, self._depths.get(id(child), 1))
                if type(child) in _MUTABLE:
                    self._nested.add(id(child))
        if deepest >= MAX_DEPTH:
            raise _too_deep()
        return deepest + 1

    def _push_new(self, container: Any, depth: int) -> None:
        # Only depths above 1 are kept (the default), so flat containers cost no entry.
        if depth > 1:
            self._depths[id(container)] = depth
        else:
            self._depths.pop(id(container), None)  # left by a freed container at this address
        self._nested.discard(id(container))
        self.append(container)

    def _before_filling(self, target: Any, children: Sequence[Any]) -> None:
        """Called before ``children`` go into ``target`` (APPEND(S), SETITEM(S))."""
        depth = self._depth_holding(children)
        if type(target) in _MUTABLE:
            if id(target) in self._nested:
                raise pickle.UnpicklingError(
                    "a list or dict filled after being nested in another container (cyclic data) "
                    "is not allowed in a dataset file")
            depth = max(self._depths.get(id(target), 1), depth)
            if depth > 1:
                self._depths[id(target)] = depth

    def _pop_top(self, count: int) -> list[Any]:
        if len(self.stack) < count:
            raise pickle.UnpicklingError("unpickling stack underflow")
        items = self.stack[-count:]
        del self.stack[-count:]
        return items

    def load_mark(self) -> None:
        # Every MARK opens a container (and costs a list until it closes), so it nests no deeper.
        if len(self.metastack) >= MAX_DEPTH:
            raise _too_deep()
        pickle._Unpickler.load_mark(self)  # type: ignore[attr-defined]

    def load_empty_list(self) -> None:
        self._push_new([], 1)

    def load_empty_dictionary(self) -> None:
        self._push_new({}, 1)

    def load_list(self) -> None:
        items = self.pop_mark()
        self._push_new(items, self._depth_holding(items))

    def load_tuple(self) -> None:
        items = self.pop_mark()
        self._push_new(tuple(items), self._depth_holding(items))

    def load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for a dict")
        keys, values = items[0::2], items[1::2]
        _check_keys(keys)
        self._push_new(dict(zip(keys, values)), self._depth_holding(values))

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        self._before_filling(target, [value])
        target.append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        self._before_filling(target, items)
        target.extend(items)

    def load_setitem(self) -> None:
        key, value = self._pop_top(2)
        target = self.stack[-1]
        _check_keys([key])
        self._before_filling(target, [value])
        target[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for a dict")
        target = self.stack[-1]
        _check_keys(items[0::2])
        self._before_filling(target, items[1::2])
        for key, value in zip(items[0::2], items[1::2]):
            target[key] = value

    # --- stand-ins and byte strings

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, (_ArrayStub, _DtypeStub)):
            raise pickle.UnpicklingError("object state (BUILD) is allowed only for numpy arrays and dtypes")
        inst.__setstate__(state)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in _STUB_CALLABLES) or not isinstance(args, tuple):
            raise pickle.UnpicklingError("calls (REDUCE) are allowed only for numpy array reconstruction")
        self.stack[-1] = func(*args)

    def load_bytearray8(self) -> None:
        # The stock version allocates (and zeroes) the claimed length before reading any of it.
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    for _op, _load in ((pickle.MARK, load_mark), (pickle.EMPTY_LIST, load_empty_list), (pickle.EMPTY_DICT, load_empty_dictionary),
                       (pickle.LIST, load_list), (pickle.TUPLE, load_tuple), (pickle.DICT, load_dict),
                       (pickle.TUPLE1, _tuple_of(1)), (pickle.TUPLE2, _tuple_of(2)),
                       (pickle.TUPLE3, _tuple_of(3)), (pickle.APPEND, load_append),
                       (pickle.APPENDS, load_appends), (pickle.SETITEM, load_setitem),
                       (pickle.SETITEMS, load_setitems), (pickle.BUILD, load_build),
                       (pickle.REDUCE, load_reduce), (pickle.BYTEARRAY8, load_bytearray8)):
        dispatch[_op[0]] = _load
    for _op, _what in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.NEWOBJ, "NEWOBJ"),
                       (pickle.NEWOBJ_EX, "NEWOBJ_EX"), (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"),
                       (pickle.EXT4, "EXT4"), (pickle.EMPTY_SET, "a set"), (pickle.ADDITEMS, "a set"),
                       (pickle.FROZENSET, "a frozenset"), (pickle.NEXT_BUFFER, "an out-of-band buffer"),
                       (pickle.PERSID, "a persistent id"), (pickle.BINPERSID, "a persistent id")):
        dispatch[_op[0]] = _refuse(_what)
    del _op, _load, _what


def _materialise(obj: Any, memo: dict[int, Any], depth: int = 0) -> Any:
    """Replace the stubs in a loaded object graph by validated numpy arrays.

    Memoised by identity, so a graph that shares sub-objects (a "billion laughs" pickle) costs
    time linear in its distinct objects; depth-limited, so cycles and absurd nesting end in an
    error rather than a crash.
    """
    if depth > MAX_DEPTH:
        raise pickle.UnpicklingError("object nesting too deep")
    if isinstance(obj, (str, bytes, int, float, type(None))):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, (_ArrayStub, _FrombufferStub)):
        out: Any = obj.to_array()
    elif isinstance(obj, dict):
        out = {_materialise(k, memo, depth + 1): _materialise(v, memo, depth + 1) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [_materialise(v, memo, depth + 1) for v in obj]
    elif isinstance(obj, tuple):
        out = tuple(_materialise(v, memo, depth + 1) for v in obj)
    elif isinstance(obj, (bytearray, memoryview, complex)):
        out = obj
    else:
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} object in a dataset file")
    memo[key] = out
    return out


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` (a Python 2 or 3 pickle) allowing only plain containers and numeric arrays."""
    obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    return _materialise(obj, {})
