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


def _index(zero_padding=True):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    objects = torch.randn(2, 3, 4, generator=g) * mask.unsqueeze(-1)
    if not zero_padding:
        objects[1, 2, 0] = 1.0
    return {"global_": torch.randn(2, 4, generator=g), "objects": objects, "mask": mask}


@pytest.mark.parametrize("zero_padding", [True, False])
def test_packed_fields_come_back_exactly(tmp_path, zero_padding):
    path = str(tmp_path / "m.npz")
    index = _index(zero_padding)
    ec.save(path, ["c0", "c1"], index, None)
    names = set(ec.read_npz(path))
    assert ("index.objects@packed" in names) == zero_padding  # non-zero padding is stored whole
    fields = {"global_": ("f", (4,)), "objects": ("f", (3, 4)), "mask": ("b", (3,))}
    ids, got, rel = ec.load(path, ["c0", "c1"], fields, None)
    assert ids == ["c0", "c1"] and rel is None
    for k, v in index.items():
        assert torch.equal(got[k], v), k


def test_packed_field_of_the_wrong_size_is_rebuilt(tmp_path, caplog):
    path = str(tmp_path / "m.npz")
    index = _index()
    arrays = {"ids": np.array(["c0", "c1"]), "index.global_": index["global_"].numpy(),
              "index.mask": index["mask"].numpy(), "index.objects@packed": np.zeros((2, 4), np.float32)}
    np.savez(path, **arrays)  # 3 real slots in the mask, 2 rows
    fields = {"global_": ("f", (4,)), "objects": ("f", (3, 4)), "mask": ("b", (3,))}
    assert ec.load(path, ["c0", "c1"], fields, None) is None
    assert "real slots" in caplog.text and "rebuilding" in caplog.text
