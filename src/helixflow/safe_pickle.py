"""Reading dictionary pickles without running code.

``pickle.load`` calls whatever importable function a file names (that is how a pickle
rebuilds an object), so a dictionary file from a folder, an archive or a download can run
anything. :func:`load_plain_dict` reads with a :class:`pickle.Unpickler` whose
``find_class`` refuses every global (the "Restricting Globals" recipe of Python's pickle
docs): dicts, lists, tuples, strings, bytes, numbers, booleans and ``None`` need no global
and load as usual. Allowed beyond that, each through a wrapper that checks its arguments:

- numpy's scalar reconstruction (``numpy.dtype`` and ``numpy._core.multiarray.scalar``,
  spelt ``numpy.core.multiarray.scalar`` by numpy 1) for numeric dtypes only, as
  dictionaries written from pandas or numpy hold ``np.float32`` values; the scalar's bytes
  are read with ``np.frombuffer`` into a fresh dtype of the same type string;
- ``_codecs.encode(text, "latin1")``, which is how protocols 0-2 (no bytes opcode) store
  those bytes.
"""

from __future__ import annotations

import pickle
import reprlib
from pathlib import Path

import numpy as np

from helixflow.errors import HelixflowError

# Kinds of numpy scalars a dictionary may hold: boolean, signed and unsigned integer, float.
NUMERIC_DTYPE_KINDS = "biuf"

VALUE_CHECKS = {
    "integer": lambda value: isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)),
    "number": lambda value: isinstance(value, (int, float, np.integer, np.floating))
    and not isinstance(value, (bool, np.bool_)),
    "string": lambda value: isinstance(value, str),
}


class _Refused(Exception):
    """A global the file asks for that plain data never needs."""


def _numeric_dtype(spec, *args) -> np.dtype:
    if not isinstance(spec, str):
        raise _Refused(f"numpy.dtype({spec!r})")
    dtype = np.dtype(spec, *args)
    if dtype.kind not in NUMERIC_DTYPE_KINDS:
        raise _Refused(f"numpy.dtype({spec!r}), which is not numeric")
    return dtype


def _numeric_scalar(dtype, data):
    # A fresh dtype from the type string, equal to the one the file built: its state
    # (set by the pickle after construction) may add no fields or object parts.
    fresh = np.dtype(dtype.str) if isinstance(dtype, np.dtype) else None
    if fresh is None or fresh != dtype or fresh.kind not in NUMERIC_DTYPE_KINDS or fresh.fields is not None:
        raise _Refused(f"a numpy scalar of {dtype!r}")
    if not isinstance(data, bytes) or len(data) != fresh.itemsize:
        raise _Refused(f"a numpy scalar of {fresh} from {data!r:.40}")
    return np.frombuffer(data, dtype=fresh)[0]


def _latin1_bytes(text, encoding):
    # Protocols 0-2 have no bytes opcode: they store bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({text!r:.40}, {encoding!r:.40})")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy._core.multiarray", "scalar"): _numeric_scalar,
    ("numpy.core.multiarray", "scalar"): _numeric_scalar,
}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load_plain_dict(path: Path, *, value_kind: str) -> dict:
    """Load a pickled ``dict`` of strings to values of one kind, running no code.

    Parameters
    ----------
    path
        The pickle file.
    value_kind
        What every value must be: ``"integer"``, ``"number"`` or ``"string"``.

    Raises
    ------
    HelixflowError
        Naming the file and the forbidden global when the pickle asks for anything beyond
        plain data, or what is wrong when it is unreadable or not such a dictionary.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            content = _PlainDataUnpickler(handle).load()
    except _Refused as refused:
        raise HelixflowError(
            path,
            f"refused to load: the pickle asks for {refused}, which could run code; "
            "a dictionary file may hold only dicts, strings and numbers",
        ) from None
    except OSError as error:
        raise HelixflowError(path, f"cannot read: {error.strerror}") from None
    # Truncated or garbled pickles raise any of these from the unpickler's opcodes.
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise HelixflowError(path, f"not a readable pickle ({type(error).__name__}: {error})") from None
    _check_plain_dict(path, content, value_kind=value_kind)
    return content


def _check_plain_dict(path: Path, content, *, value_kind: str) -> None:
    if not isinstance(content, dict):
        raise HelixflowError(path, f"holds a {type(content).__name__}, not a dictionary")
    is_value = VALUE_CHECKS[value_kind]
    for key, value in content.items():
        if not isinstance(key, str):
            raise HelixflowError(path, f"has a key {reprlib.repr(key)} of type {type(key).__name__}; keys must be strings")
        if not is_value(value):
            raise HelixflowError(path, f"maps {reprlib.repr(key)} to {reprlib.repr(value)} ({type(value).__name__}); "
                                 f"values must be of kind {value_kind}")
