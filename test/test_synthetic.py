"""The synthetic city generator: determinism and the invariants of the release's preparation."""
import filecmp
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from spatialoc_ros.data import synthetic
from spatialoc_ros.data.constants import CLASSES, COLOR_NAMES, SCENES_ALL, STUFF_CLASSES, color_name
from spatialoc_ros.data.kitti360pose import direction_of
from spatialoc_ros.data.loading import load_scene, load_split

REPO_ROOT = Path(__file__).resolve().parents[1]
ID_RE = re.compile(r"^\d{4}_\d{5}$")


def _files(folder):
    out = []
    for sub in ("cells", "poses", "direction"):
        out += [os.path.join(sub, f) for f in sorted(os.listdir(os.path.join(folder, sub)))]
    return out


def test_same_seed_same_bytes_across_processes(small_city, tmp_path):
    out = tmp_path / "again"
    res = subprocess.run([sys.executable, "-m", "spatialoc_ros.data.synthetic", "--out", str(out), "--seed", "0",
                          "--scale", "small"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr
    assert re.search(r"train:\s+\d+ queries", res.stdout) and "val" in res.stdout and "test" in res.stdout
    names = _files(small_city)
    assert len(names) == 3 * 9 and names == _files(out)
    match, mismatch, errors = filecmp.cmpfiles(small_city, out, names + ["synthetic_city.json"], shallow=False)
    assert not mismatch and not errors and len(match) == len(names) + 1


def test_scene_subset_and_other_seed(small_city, tmp_path):
    scenes = ["2013_05_28_drive_0003_sync", "2013_05_28_drive_0010_sync"]
    synthetic.generate_city(str(tmp_path / "s0"), seed=0, scale="small", scenes=scenes)
    synthetic.generate_city(str(tmp_path / "s1"), seed=1, scale="small", scenes=scenes)
    for scene in scenes:
        for sub, ext in (("cells", "pkl"), ("poses", "pkl"), ("direction", "json")):
            name = f"{sub}/{scene}.{ext}"
            same = (tmp_path / "s0" / name).read_bytes()
            assert same == Path(small_city, name).read_bytes()  # a scene depends only on seed and scale
            assert (tmp_path / "s1" / name).read_bytes() != same
    assert sorted(os.listdir(tmp_path / "s0" / "cells")) == sorted(f"{s}.pkl" for s in scenes)
    with pytest.raises(ValueError, match="unknown scale"):
        synthetic.generate_city(str(tmp_path / "x"), seed=0, scale="huge")
    with pytest.raises(ValueError, match="unknown scene"):
        synthetic.generate_city(str(tmp_path / "x"), seed=0, scale="small", scenes=["2013_05_28_drive_0001_sync"])


def test_cell_invariants(small_city):
    palettes = {label: {COLOR_NAMES[i] for i, _ in pal} for label, pal in synthetic.PALETTES.items()}
    for scene in SCENES_ALL:
        data = load_scene(small_city, scene)
        short = scene.split("_")[-2]
        assert 2 <= len(data.cells) <= 60
        for cell in data.cells:
            assert ID_RE.match(cell.id) and cell.id.startswith(short + "_") and cell.scene_name == short
            assert len(cell.objects) >= 6
            assert [o.id for o in cell.objects] == list(range(len(cell.objects)))
            assert cell.cell_size == 30.0
            bbox = np.asarray(cell.bbox_w)
            assert bbox.shape == (6,)
            np.testing.assert_allclose(bbox[3:6] - bbox[0:3], 30.0)
            for o in cell.objects:
                assert o.label in CLASSES and o.label != "pad"
                assert o.xyz.ndim == 2 and o.xyz.shape[1] == 3 and o.rgb.shape == o.xyz.shape
                assert 10 <= len(o.xyz) <= 400
                assert o.rgb.min() >= 0.0 and o.rgb.max() <= 1.0
                assert o.get_color_text() in palettes[o.label], (o.label, o.get_color_text())
                inside = np.all((o.xyz >= -1e-6) & (o.xyz <= 1 + 1e-6), axis=1)
                if o.label in STUFF_CLASSES:
                    assert inside.all()  # stuff is cropped to the cell
                else:
                    assert inside.mean() >= 1 / 3 - 1e-9  # instances kept whole when >= 1/3 inside
            # pieces of one stuff instance share its instance id; instance objects occur once
            inst = Counter((o.instance_id, o.label) for o in cell.objects if o.label not in STUFF_CLASSES)
            assert max(inst.values(), default=1) == 1


def test_pose_invariants(small_city):
    data = load_split(small_city, "all")
    centres = {}
    for c in data.cells:
        centres.setdefault(c.scene_name, []).append((c.id, c.get_center()))
    on_top = unmatched = matched = 0
    strategies = Counter()
    seen = set()
    per_scene = Counter(p.scene_name for p in data.poses)
    assert all(20 <= n <= 80 for n in per_scene.values()) and len(per_scene) == 9
    for pose in data.poses:
        cell = data.cells_dict[pose.cell_id]
        assert pose.scene_name == cell.scene_name
        strategies[pose.described_by] += 1
        assert pose.described_by in ("closest", "class", "direction")
        assert len(pose.descriptions) == 6
        np.testing.assert_allclose(pose.pose, (pose.pose_w - cell.bbox_w[0:3]) / cell.cell_size, atol=1e-12)
        assert np.all(pose.pose >= 0) and np.all(pose.pose <= 1)
        assert np.linalg.norm(pose.pose_w[0:2] - cell.get_center()[0:2]) <= 15.0
        # the best cell is the database cell with the closest centre
        ids, cs = zip(*centres[pose.scene_name])
        d = np.linalg.norm(np.array(cs)[:, 0:2] - pose.pose_w[0:2], axis=1)
        assert d[ids.index(pose.cell_id)] <= d.min() + 1e-9
        key = (tuple(np.round(pose.pose_w, 6)), tuple(sorted(h.object_id for h in pose.descriptions if h.is_matched)))
        assert key not in seen  # duplicates were dropped
        seen.add(key)
        for h in pose.descriptions:
            assert h.direction == direction_of(np.zeros(2), np.asarray(h.offset_closest))
            assert h.object_color_text == color_name(h.object_color_rgb)
            assert h.object_label in CLASSES
            on_top += h.direction == "on-top"
            if h.is_matched:
                matched += 1
                assert 0 <= h.object_id < len(cell.objects)
                obj = cell.objects[h.object_id]
                assert obj.instance_id == h.object_instance_id and obj.label == h.object_label
                assert np.min(np.linalg.norm(obj.xyz[:, 0:2] - h.closest_point, axis=1)) < 1e-6
                np.testing.assert_allclose(h.best_offset_closest, pose.pose[0:2] - h.closest_point, atol=1e-6)
                np.testing.assert_allclose(h.best_offset_center, (pose.pose - obj.get_center())[0:2], atol=1e-6)
            else:
                unmatched += 1
                assert h.object_id is None and h.best_offset_center is None and h.best_offset_closest is None
    assert on_top >= 1 and unmatched >= 1 and matched > unmatched
    assert set(strategies) == {"closest", "class", "direction"}


def test_hard_part_recurring_pairs(small_city):
    data = load_split(small_city, "all")
    cells_with = Counter()
    for cell in data.cells:
        cells_with.update({(o.label, o.get_color_text()) for o in cell.objects})
    top = cells_with.most_common(3)
    assert top[-1][1] >= 0.3 * len(data.cells), top
    # the same pair recurs in several scenes
    scenes_with = Counter()
    for scene in SCENES_ALL:
        pairs = set()
        for cell in load_scene(small_city, scene).cells:
            pairs.update((o.label, o.get_color_text()) for o in cell.objects)
        scenes_with.update(pairs)
    assert scenes_with.most_common(1)[0][1] == 9


def test_default_city_path_and_ensure(monkeypatch, tmp_path):
    monkeypatch.delenv("SPATIALOC_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert synthetic.default_city_path() == str(tmp_path / "home" / ".cache" / "spatialoc_ros" / "default_city_seed0")
    monkeypatch.setenv("SPATIALOC_DATA_DIR", str(tmp_path / "data"))
    assert synthetic.default_city_path() == str(tmp_path / "data" / "default_city_seed0")
    # keep the test fast: the default scale behaves as the small one here
    monkeypatch.setitem(synthetic.SCALES, "default", synthetic.SCALES["small"])
    calls = []
    real = synthetic.generate_city

    def counting(out_dir, seed=0, scale="default", **kw):
        calls.append((seed, scale))
        assert not out_dir.endswith("default_city_seed0")  # written elsewhere, then renamed
        return real(out_dir, seed=seed, scale=scale, **kw)

    monkeypatch.setattr(synthetic, "generate_city", counting)
    logs = []
    path = synthetic.ensure_default_city(log=logs.append)
    assert path == synthetic.default_city_path()
    assert calls == [(0, "default")] and logs
    assert len(load_split(path, "test").poses) > 0
    assert synthetic.ensure_default_city(log=None) == path and len(calls) == 1
    assert os.listdir(tmp_path / "data") == ["default_city_seed0"]  # no temporary folder left behind
    # a city written by another generator version is replaced
    info = Path(path, "synthetic_city.json")
    info.write_text(info.read_text().replace(f'"version": {synthetic.GENERATOR_VERSION}', '"version": 0'))
    assert synthetic.ensure_default_city(log=None) == path and len(calls) == 2
    assert f'"version": {synthetic.GENERATOR_VERSION}' in info.read_text()
    assert os.listdir(tmp_path / "data") == ["default_city_seed0"]


#: sha256 over `sha256sum` of every file of the small city, seed 0 (sorted paths), as written
#: before the variation options existed: the defaults must keep writing these bytes.
SMALL_SEED0_DIGEST = "17503f3a079e99597a050a64bb6f1a283c0372bd368f035a0d997929374a0fa3"


def _tree_digest(folder) -> str:
    import hashlib

    lines = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = "./" + str(path.relative_to(folder))
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_default_variation_keeps_the_original_bytes(small_city):
    assert _tree_digest(small_city) == SMALL_SEED0_DIGEST


def test_variation_options_change_the_world_and_are_recorded(small_city, tmp_path):
    out = tmp_path / "varied"
    res = subprocess.run([sys.executable, "-m", "spatialoc_ros.data.synthetic", "--out", str(out), "--seed", "0",
                          "--scale", "small", "--quiet", "--block_scale", "0.7", "--density", "0.5",
                          "--palette_mix", "0.3", "--drop_objects", "0.2", "--size_jitter", "0.3"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr
    import json

    info = json.loads((out / "synthetic_city.json").read_text())
    assert info["variation"]["density"] == 0.5 and info["variation"]["block_scale"] == 0.7
    assert "variation" not in json.loads(Path(small_city, "synthetic_city.json").read_text())
    base, varied = load_split(small_city, "test"), load_split(str(out), "test")
    points = lambda data: np.mean([len(o.xyz) for c in data.cells for o in c.objects])  # noqa: E731
    assert points(varied) < 0.8 * points(base)  # density 0.5 (cells also crop objects)
    for cell in varied.cells[:20]:  # still the release's format and rules
        assert len(cell.objects) >= 6
    for bad in (["--density", "0"], ["--palette_mix", "1.5"], ["--block_scale", "nan"]):
        r = subprocess.run([sys.executable, "-m", "spatialoc_ros.data.synthetic", "--out", str(tmp_path / "x"),
                            "--scale", "small", *bad], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="density"):
        synthetic.Variation(density=0.0)
    rng = np.random.default_rng(0)
    assert not synthetic.Variation.random(rng).is_default and synthetic.Variation().is_default
