"""The map cache's file reader and packed per-object fields (tiny arrays)."""
import numpy as np
import pytest
import torch

from spatialoc_ros.models import embedding_cache as ec


def _arrays():
    g = np.random.default_rng(0)
    return {"a": g.random((5, 3)).astype(np.float32), "ids": np.array(["x1", "cell_22"], dtype=np.str_),
            "f": np.asfortranarray(g.random((4, 6))), "z": np.array(3.5), "e": np.zeros((0, 4), np.int64),
            "b": np.array([True, False])}


def test_read_npz_gives_what_numpy_reads(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, **_arrays())
    got = ec.read_npz(str(path))
    with np.load(path, allow_pickle=False) as want:
        assert sorted(got) == sorted(want.files)
        for k in want.files:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            assert np.array_equal(got[k], want[k]), k
    assert got["f"].flags.f_contiguous


def test_read_npz_refuses_damage_compression_and_objects(tmp_path):
    arrays = _arrays()
    path = tmp_path / "t.npz"
    np.savez(path, **arrays)
    raw = bytearray(path.read_bytes())
    raw[raw.find(arrays["a"].tobytes()) + 5] ^= 1  # one bit of one float
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC"):
        ec.read_npz(str(tmp_path / "bad.npz"))
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    with pytest.raises(ValueError, match="not a stored"):
        ec.read_npz(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "o.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="Python objects"):
        ec.read_npz(str(tmp_path / "o.npz"))


def test_large_arrays_are_mapped_checked_and_private(tmp_path, monkeypatch):
    monkeypatch.setattr(ec, "_MAP_BYTES", 48)  # every array of 48 bytes or more is mapped
    arrays = _arrays()
    path = tmp_path / "t.npz"
    np.savez(path, **arrays)
    before = path.read_bytes()
    got = ec.read_npz(str(path))
    assert isinstance(got["a"], np.memmap) and isinstance(got["f"], np.memmap) and not isinstance(got["b"], np.memmap)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    t = torch.from_numpy(got["a"])
    t += 1.0  # the process's own copy: the file is unchanged
    assert path.read_bytes() == before
    raw = bytearray(before)
    raw[raw.find(arrays["f"].tobytes(order="F")) + 9] ^= 1
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC"):
        ec.read_npz(str(tmp_path / "bad.npz"))
    (tmp_path / "short.npz").write_bytes(before[:before.find(arrays["f"].tobytes(order="F")) + 20])
    with pytest.raises(Exception):  # a cut file: its directory is gone (zipfile) or a member ends early
        ec.read_npz(str(tmp_path / "short.npz"))


def _index():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return {"global_": torch.randn(2, 4, generator=g), "mask": mask, "objects": torch.randn(3, 4, generator=g)}


_FIELDS = {"global_": ("f", (4,)), "mask": ("b", (3,)), "objects": ("f", (4,))}


def test_packed_fields_come_back_exactly(tmp_path):
    path = str(tmp_path / "m.npz")
    index = _index()
    ec.save(path, ["c0", "c1"], index, None)
    assert set(ec.read_npz(path)) == {"ids", "index.global_", "index.mask", "index.objects@packed"}
    ids, got, rel = ec.load(path, ["c0", "c1"], _FIELDS, None)
    assert ids == ["c0", "c1"] and rel is None
    for k, v in index.items():
        assert torch.equal(got[k], v), k


def test_packed_field_of_the_wrong_size_is_rebuilt(tmp_path, caplog):
    path = str(tmp_path / "m.npz")
    index = _index()
    arrays = {"ids": np.array(["c0", "c1"]), "index.global_": index["global_"].numpy(),
              "index.mask": index["mask"].numpy(), "index.objects@packed": np.zeros((2, 4), np.float32)}
    np.savez(path, **arrays)  # 3 real slots in the mask, 2 rows
    assert ec.load(path, ["c0", "c1"], _FIELDS, None) is None
    assert "for 3 rows" in caplog.text and "rebuilding" in caplog.text
    caplog.clear()
    arrays["index.objects"] = np.zeros((2, 3, 4), np.float32)  # a padded field is not what is read
    del arrays["index.objects@packed"]
    np.savez(path, **arrays)
    assert ec.load(path, ["c0", "c1"], _FIELDS, None) is None
    assert "index.objects@packed missing" in caplog.text


def _cells():
    from spatialoc_ros.data.kitti360pose import Cell, Object3d

    g = np.random.default_rng(0)

    def obj(k, n, label="pole"):
        return Object3d(k, k, g.random((n, 3)).astype(np.float32), g.random((n, 3)).astype(np.float32), label)

    return [Cell("c0", "s", [obj(0, 4), obj(1, 3, "building")], 30.0, np.array([0, 0, 0, 30, 30, 5.0])),
            Cell("c1", "s", [obj(2, 5)], 30.0, np.array([30, 0, 0, 60, 30, 5.0]))]


def test_map_digest_follows_every_part_of_the_content():
    import copy

    base = ec.map_digest(_cells())
    assert ec.map_digest(_cells()) == base

    def changed(edit):
        cells = copy.deepcopy(_cells())
        edit(cells)
        return ec.map_digest(cells)

    def nudge(cells):
        cells[1].objects[0].xyz[2, 1] += 1e-6

    def relabel(cells):
        cells[0].objects[1].label = "pole"

    def move_point(cells):  # the same bytes, split differently between two objects
        a, b = cells[0].objects
        both = np.concatenate([a.xyz, b.xyz]), np.concatenate([a.rgb, b.rgb])
        a.xyz, b.xyz, a.rgb, b.rgb = both[0][:3], both[0][3:], both[1][:3], both[1][3:]

    def widen(cells):
        cells[0].objects[0].rgb = cells[0].objects[0].rgb.astype(np.float64)

    def shift_box(cells):
        cells[1].bbox_w = cells[1].bbox_w + 0.5

    digests = {changed(e) for e in (nudge, relabel, move_point, widen, shift_box)}
    assert len(digests) == 5 and base not in digests

    def strided(cells):  # equal values in a non-contiguous array: the same content
        o = cells[0].objects[0]
        o.xyz = np.asfortranarray(o.xyz)
        o.rgb = np.repeat(o.rgb, 2, axis=0)[::2]

    assert changed(strided) == base
