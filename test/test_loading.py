"""Loading KITTI360Pose folders: release pickles, the synthetic city, splits, direction maps."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spatialoc_ros.data.constants import SCENES_ALL, SCENES_TEST, SCENES_TRAIN, SCENES_VAL, SPLITS
from spatialoc_ros.data.kitti360pose import Cell, DescriptionBestCell, Object3d, Pose
from spatialoc_ros.data.loading import (
    DataFormatError,
    available_scenes,
    cell_world_position,
    load_direction_map,
    load_scene,
    load_scenes,
    load_split,
    query_text,
    scenes_of_split,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Writes a tiny folder with stand-ins for the release's classes, defined in fake modules named as the
# release's (both module paths occur in published files). Runs in a subprocess so that the test
# process never has those modules.
_WRITE_RELEASE_FOLDER = textwrap.dedent('''
    import os, pickle, sys, types
    import numpy as np

    out = sys.argv[1]

    def make_module(modname):
        for i in range(1, modname.count(".") + 1):
            parent = ".".join(modname.split(".")[:i])
            sys.modules.setdefault(parent, types.ModuleType(parent))
        mod = types.ModuleType(modname)
        sys.modules[modname] = mod
        src = """
    class Object3d:
        def __init__(self, id, instance_id, xyz, rgb, label):
            self.id = id
            self.instance_id = instance_id
            self.xyz = xyz
            self.rgb = rgb
            self.label = label

    class DescriptionBestCell:
        @classmethod
        def from_matched(cls, obj, direction, offset_center, offset_closest, object_id, closest_point,
                         best_offset_center, best_offset_closest):
            d = cls()
            d.object_instance_id = obj.instance_id
            d.object_label = obj.label
            d.object_color_rgb = obj.rgb.mean(axis=0)
            d.object_color_text = "gray"
            d.direction = direction
            d.offset_center = offset_center
            d.offset_closest = offset_closest
            d.object_id = object_id
            d.closest_point = closest_point
            d.best_offset_center = best_offset_center
            d.best_offset_closest = best_offset_closest
            d.is_matched = True
            return d

        @classmethod
        def from_unmatched(cls, obj, direction, offset_center, offset_closest, closest_point):
            # the release sets neither object_id nor the best_* attributes here
            d = cls()
            d.object_instance_id = obj.instance_id
            d.object_label = obj.label
            d.object_color_rgb = obj.rgb.mean(axis=0)
            d.object_color_text = "beige"
            d.direction = direction
            d.offset_center = offset_center
            d.offset_closest = offset_closest
            d.closest_point = closest_point
            d.is_matched = False
            return d

    class Pose:
        def __init__(self, pose_in_cell, pose_w, cell_id, scene_name, descriptions, described_by=None):
            self.pose = pose_in_cell
            self.pose_w = pose_w
            self.cell_id = cell_id
            self.descriptions = descriptions
            self.scene_name = scene_name
            self.described_by = described_by

    class Cell:
        def __init__(self, idx, scene_name, objects, cell_size, bbox_w):
            self.scene_name = scene_name
            self.id = f"{scene_name}_{idx:05.0f}"
            self.objects = objects
            self.cell_size = cell_size
            self.bbox_w = bbox_w
    """
        exec(compile(src, modname, "exec"), mod.__dict__)
        for name in ("Object3d", "DescriptionBestCell", "Pose", "Cell"):
            getattr(mod, name).__module__ = modname
        return mod

    rng = np.random.default_rng(7)
    labels = ["building", "pole", "road", "sidewalk", "vegetation", "lamp", "terrain"]
    plan = [("2013_05_28_drive_0003_sync", "datapreparation.kitti360.imports", 4, 3, 5),
            ("2013_05_28_drive_0010_sync", "datapreparation.kitti360pose.imports", 2, 2, 4)]
    os.makedirs(os.path.join(out, "cells"))
    os.makedirs(os.path.join(out, "poses"))
    for scene, modname, protocol, n_cells, n_poses in plan:
        m = make_module(modname)
        short = scene.split("_")[-2]
        cells = []
        for c in range(n_cells):
            objs = [m.Object3d(i, 1000 + 10 * c + i, rng.uniform(0, 1, (40, 3)),
                               rng.uniform(0, 1, (40, 3)).astype(np.float32), labels[i]) for i in range(7)]
            x0 = 100.0 + 10 * c
            cells.append(m.Cell(3 * c + 1, short, objs, 30.0, np.array([x0, 50.0, 0.0, x0 + 30.0, 80.0, 30.0])))
        poses = []
        for p in range(n_poses):
            cell = cells[p % n_cells]
            descs = []
            for k in range(6):
                obj = cell.objects[k]
                off = rng.uniform(-0.3, 0.3, 2)
                direction = ["north", "east", "on-top", "south", "west", "north"][(p + k) % 6]
                if k == 5:
                    descs.append(m.DescriptionBestCell.from_unmatched(obj, direction, off, off, off))
                else:
                    descs.append(m.DescriptionBestCell.from_matched(obj, direction, off, off, obj.id, off, off, off))
            poses.append(m.Pose(np.array([0.5, 0.5, 0.5]), cell.bbox_w[0:3] + 15.0, cell.id, short, descs,
                                ["closest", "class", "direction"][p % 3]))
        with open(os.path.join(out, "cells", scene + ".pkl"), "wb") as f:
            pickle.dump(cells, f, protocol=protocol)
        with open(os.path.join(out, "poses", scene + ".pkl"), "wb") as f:
            pickle.dump(poses, f, protocol=protocol)
    print("written")
''')


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "k360_30-10_scG_pd10_pc4_spY_all"
    res = subprocess.run([sys.executable, "-c", _WRITE_RELEASE_FOLDER, str(out)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return str(out)


def test_release_pickles_load_without_release_modules(release_folder):
    assert "datapreparation" not in sys.modules
    assert importlib.util.find_spec("datapreparation") is None
    for sub in ("cells", "poses"):
        for name in os.listdir(os.path.join(release_folder, sub)):
            raw = open(os.path.join(release_folder, sub, name), "rb").read()
            assert b"datapreparation.kitti360" in raw  # the files really name the release modules
    data = load_scene(release_folder, "2013_05_28_drive_0003_sync")
    assert [c.id for c in data.cells] == ["0003_00001", "0003_00004", "0003_00007"]
    assert all(isinstance(c, Cell) and all(isinstance(o, Object3d) for o in c.objects) for c in data.cells)
    assert len(data.poses) == 5 and all(isinstance(p, Pose) for p in data.poses)
    d_matched, d_unmatched = data.poses[0].descriptions[0], data.poses[0].descriptions[5]
    assert isinstance(d_matched, DescriptionBestCell) and d_matched.is_matched and d_matched.object_id == 0
    assert d_matched.best_offset_center is not None
    assert not d_unmatched.is_matched and d_unmatched.object_id is None and d_unmatched.best_offset_closest is None
    assert query_text(data.poses[0]).startswith("The pose is north of a gray building. The pose is east of a gray pole.")
    assert data.direction_map is None
    other = load_scene(release_folder, "2013_05_28_drive_0010_sync")  # the renamed module, protocol 2
    assert [c.id for c in other.cells] == ["0010_00001", "0010_00004"] and len(other.poses) == 4
    assert "datapreparation" not in sys.modules


def test_release_folder_via_stats_cli(release_folder):
    res = subprocess.run([sys.executable, "-m", "spatialoc_ros.data.stats", "--base_path", release_folder, "--json"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["scenes"] == {
        "2013_05_28_drive_0003_sync": {"cells": 3, "poses": 5, "objects": 21, "direction_map": False,
                                       "first_hint": "The pose is north of a gray building."},
        "2013_05_28_drive_0010_sync": {"cells": 2, "poses": 4, "objects": 14, "direction_map": False,
                                       "first_hint": "The pose is north of a gray building."},
    }
    assert st["cells"] == 5 and st["poses"] == 9
    assert st["classes"]["building"] == 5 and st["classes"]["terrain"] == 5 and st["classes"]["bridge"] == 0
    assert st["hints_per_query"] == {"6": 9}
    assert st["matched_share"] == pytest.approx(5 / 6, abs=1e-4)


def test_small_city_loads(small_city):
    assert available_scenes(small_city) == list(SCENES_ALL)
    data = load_split(small_city, "all")
    assert data.scenes == list(SCENES_ALL)
    assert len(data.cells) == len(data.cells_dict) > 9 * 6
    assert len(data.poses) >= 9 * 20
    for pose in data.poses:
        assert pose.cell_id in data.cells_dict
        cell = data.cells_dict[pose.cell_id]
        np.testing.assert_allclose(cell_world_position(cell, pose.pose), pose.pose_w[0:2], atol=1e-9)
    assert set(data.direction_map) == set(data.cells_dict)


def test_split_scene_lists(small_city):
    assert SPLITS["train"] == tuple(f"2013_05_28_drive_{n}_sync" for n in ("0000", "0002", "0004", "0006", "0007"))
    assert SPLITS["val"] == ("2013_05_28_drive_0010_sync",)
    assert SPLITS["test"] == tuple(f"2013_05_28_drive_{n}_sync" for n in ("0003", "0005", "0009"))
    assert scenes_of_split(small_city, "train") == list(SCENES_TRAIN)
    assert scenes_of_split(small_city, "val") == list(SCENES_VAL)
    assert scenes_of_split(small_city, "test") == list(SCENES_TEST)
    for split in ("train", "val", "test"):
        data = load_split(small_city, split)
        shorts = {s.split("_")[-2] for s in SPLITS[split]}
        assert {c.scene_name for c in data.cells} == shorts
        assert {p.scene_name for p in data.poses} == shorts
    with pytest.raises(ValueError):
        scenes_of_split(small_city, "bogus")


def test_direction_json(small_city):
    scene = "2013_05_28_drive_0005_sync"
    with open(os.path.join(small_city, "direction", f"{scene}.json")) as f:
        raw = json.load(f)
    assert raw == load_direction_map(small_city, scene)
    data = load_scene(small_city, scene)
    assert set(raw) == set(data.cells_dict)
    opposite = {"east": "west", "west": "east", "north": "south", "south": "north"}
    step = {"east": (10, 0), "west": (-10, 0), "north": (0, 10), "south": (0, -10)}
    linked = 0
    for cid, nb in raw.items():
        assert set(nb) == {"east", "west", "north", "south"}
        for direction, other in nb.items():
            if other is None:
                continue
            linked += 1
            assert raw[other][opposite[direction]] == cid
            delta = data.cells_dict[other].get_center()[0:2] - data.cells_dict[cid].get_center()[0:2]
            np.testing.assert_allclose(delta, step[direction], atol=1e-9)
    assert linked > 0
    assert load_direction_map(small_city, "2013_05_28_drive_9999_sync") is None


def test_loader_errors(tmp_path, small_city):
    with pytest.raises(DataFormatError, match="no cells/"):
        available_scenes(str(tmp_path))
    with pytest.raises(DataFormatError, match="missing cells file"):
        load_scene(str(tmp_path), "2013_05_28_drive_0003_sync")
    # poses that name cells absent from the cells file
    scene = "2013_05_28_drive_0003_sync"
    for sub in ("cells", "poses"):
        (tmp_path / sub).mkdir()
    data = load_scene(small_city, scene)
    (tmp_path / "cells" / f"{scene}.pkl").write_bytes(pickle.dumps(data.cells[:1], protocol=4))
    (tmp_path / "poses" / f"{scene}.pkl").write_bytes(pickle.dumps(data.poses, protocol=4))
    if any(p.cell_id != data.cells[0].id for p in data.poses):
        with pytest.raises(DataFormatError, match="absent"):
            load_scene(str(tmp_path), scene)
    (tmp_path / "direction").mkdir()
    (tmp_path / "direction" / f"{scene}.json").write_text("[1, 2]")
    with pytest.raises(DataFormatError, match="JSON object"):
        load_direction_map(str(tmp_path), scene)
    merged = load_scenes(small_city, [scene, "2013_05_28_drive_0009_sync"])
    assert merged.scenes == [scene, "2013_05_28_drive_0009_sync"]
