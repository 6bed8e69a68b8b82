"""A restricted unpickler for KITTI360Pose files.

An unrestricted ``pickle.load`` on a downloaded file runs whatever callable the file names. This
unpickler resolves only:

* the release's data classes under ``datapreparation.kitti360.imports`` and
  ``datapreparation.kitti360pose.imports`` (and this project's own module), mapped onto the
  classes of :mod:`spatialoc_ros.data.kitti360pose`;
* the few numpy globals needed to rebuild arrays and scalars;
* ``copyreg._reconstructor`` with ``builtins.object`` and ``_codecs.encode`` (protocols 0-2 store
  plain objects and bytes through them).

Any other global raises :class:`UnsafePickleError` before anything is called.
"""
from __future__ import annotations

import codecs
import copyreg
import io
import os
import pickle

import numpy as np

from spatialoc_ros.data import kitti360pose as _k

_DATA_CLASSES = {
    cls.__name__: cls
    for cls in (_k.Object3d, _k.Cell, _k.Pose, _k.DescriptionPoseCell, _k.DescriptionBestCell)
}
_DATA_MODULES = (
    "datapreparation.kitti360.imports",
    "datapreparation.kitti360pose.imports",
    _k.__name__,
)


def _numpy_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {}
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # numpy >= 1.25 pickles dtypes as numpy.dtypes.Float64DType etc. on some protocols
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "UInt8DType",
                 "BoolDType", "StrDType", "ObjectDType", "Float16DType", "Int16DType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            allowed[("numpy.dtypes", name)] = dtype_cls
    return allowed


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list. Nothing it named was executed."""


class KittiUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (see module docstring)."""

    _numpy = None

    def __init__(self, file, source: str = "<stream>"):
        super().__init__(file)
        self._source = source
        if KittiUnpickler._numpy is None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                KittiUnpickler._numpy = _numpy_globals()

    def find_class(self, module: str, name: str):
        if module in _DATA_MODULES and name in _DATA_CLASSES:
            return _DATA_CLASSES[name]
        found = self._numpy.get((module, name))
        if found is not None:
            return found
        # protocols 0-2 write Python 2 module names for these two
        if name == "_reconstructor" and module in ("copyreg", "copy_reg"):
            return copyreg._reconstructor
        if name == "object" and module in ("builtins", "__builtin__"):
            return object
        if (module, name) == ("_codecs", "encode"):  # protocols 0-2 store bytes through it
            return self._latin1_encode
        raise UnsafePickleError(
            f"refused to load {self._source}: it names the global '{module}.{name}', which is not a "
            "KITTI360Pose class or a numpy array type; only trusted KITTI360Pose files can be read"
        )

    def _latin1_encode(self, obj, encoding="utf-8", errors="strict"):
        """``_codecs.encode`` as protocols 0-2 use it (text -> bytes, latin-1); any other codec
        (zlib_codec, bz2_codec, ... decompression bombs) is refused."""
        if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1") or not isinstance(obj, str):
            raise UnsafePickleError(
                f"refused to load {self._source}: it calls _codecs.encode with codec {encoding!r}; only "
                "latin-1 (how pickle protocols 0-2 store bytes) is allowed"
            )
        return codecs.encode(obj, "latin-1", errors)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refused to load {self._source}: persistent ids are not allowed")


def safe_load_pickle(path: str | os.PathLike):
    """Load a KITTI360Pose pickle with :class:`KittiUnpickler`.

    Raises UnsafePickleError for a refused global, and pickle.UnpicklingError / EOFError /
    OSError for unreadable files.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        return KittiUnpickler(f, source=path).load()


def safe_loads_pickle(data: bytes, source: str = "<bytes>"):
    """Same as :func:`safe_load_pickle` for bytes already in memory."""
    return KittiUnpickler(io.BytesIO(data), source=source).load()
