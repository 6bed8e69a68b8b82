"""The restricted unpickler refuses anything but KITTI360Pose classes and numpy arrays."""
import _compat_pickle
import os
import pickle
import re
import subprocess

import numpy as np
import pytest

from spatialoc_ros.data.kitti360pose import Cell, DescriptionBestCell, Object3d, Pose
from spatialoc_ros.data.loading import DataFormatError, load_scene
from spatialoc_ros.data.safe_pickle import UnsafePickleError, safe_load_pickle, safe_loads_pickle


class _SystemCall:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Subprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.check_call, (["touch", self.marker],))


def _global_names(func, protocol) -> set:
    """How a pickle names ``func``: protocols < 3 write Python 2 module names where they differ."""
    module = pickle.whichmodule(func, func.__name__)
    names = {f"{module}.{func.__name__}"}
    if protocol < 3:
        names.add(f"{_compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)}.{func.__name__}")
    return names


@pytest.mark.parametrize("maker, func", [(_SystemCall, os.system), (_OpenFile, open), (_Subprocess, subprocess.check_call)])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_refused(tmp_path, maker, func, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "cells.pkl"
    # wrapped in a list as a real cells file would be
    path.write_bytes(pickle.dumps([maker(marker)], protocol=protocol))
    with pytest.raises(UnsafePickleError) as err:
        safe_load_pickle(path)
    msg = str(err.value)
    named = re.search(r"names the global '([^']+)'", msg)
    assert named and named.group(1) in _global_names(func, protocol), msg
    assert str(path) in msg
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        safe_loads_pickle(path.read_bytes())
    assert not marker.exists()


def test_malicious_pickle_refused_by_loader(tmp_path):
    marker = tmp_path / "pwned"
    scene = "2013_05_28_drive_0003_sync"
    (tmp_path / "cells").mkdir()
    (tmp_path / "poses").mkdir()
    (tmp_path / "cells" / f"{scene}.pkl").write_bytes(pickle.dumps([_SystemCall(marker)], protocol=4))
    (tmp_path / "poses" / f"{scene}.pkl").write_bytes(pickle.dumps([], protocol=4))
    with pytest.raises(UnsafePickleError, match="posix.system|nt.system"):
        load_scene(str(tmp_path), scene)
    assert not marker.exists()


def test_other_codecs_refused():
    # protocols 0-2 store bytes via _codecs.encode(text, 'latin1'); another codec must not run
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x0a\x00\x00\x00zlib_codecq\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafePickleError, match="zlib_codec"):
        safe_loads_pickle(payload)


def _sample_objects():
    rng = np.random.default_rng(1)
    obj = Object3d(0, 11001, rng.uniform(0, 1, (20, 3)).astype(np.float32), rng.uniform(0, 1, (20, 3)), "pole")
    cell = Cell("0003_00007", "0003", [obj], 30.0, np.array([0.0, 0.0, 0.0, 30.0, 30.0, 30.0]))
    d = DescriptionBestCell(0, 11001, "pole", np.array([0.5, 0.5, 0.5]), "gray", "east",
                            np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), True)
    pose = Pose(np.array([0.5, 0.5, 0.5]), np.array([15.0, 15.0, 15.0]), cell.id, "0003", [d] * 6, "closest")
    return cell, pose


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_own_classes_round_trip(protocol):
    cell, pose = _sample_objects()
    cell2, pose2 = safe_loads_pickle(pickle.dumps([cell, pose], protocol=protocol))
    assert isinstance(cell2, Cell) and isinstance(pose2, Pose)
    np.testing.assert_array_equal(cell2.objects[0].xyz, cell.objects[0].xyz)
    assert cell2.objects[0].xyz.dtype == np.float32
    assert pose2.descriptions[0].hint() == "The pose is east of a gray pole."


def test_garbage_is_a_format_error(tmp_path):
    scene = "2013_05_28_drive_0003_sync"
    (tmp_path / "cells").mkdir()
    (tmp_path / "poses").mkdir()
    (tmp_path / "poses" / f"{scene}.pkl").write_bytes(pickle.dumps([], protocol=4))
    rng = np.random.default_rng(0)
    for i in range(30):
        junk = bytes(rng.integers(0, 256, int(rng.integers(1, 80)), dtype=np.uint8))
        if i % 2:
            junk = b"\x80\x04" + junk
        (tmp_path / "cells" / f"{scene}.pkl").write_bytes(junk)
        with pytest.raises((DataFormatError, UnsafePickleError)):
            load_scene(str(tmp_path), scene)
    # a valid pickle of the wrong thing
    (tmp_path / "cells" / f"{scene}.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(DataFormatError, match="list of cells"):
        load_scene(str(tmp_path), scene)
