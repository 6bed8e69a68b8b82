"""`python -m spatialoc_ros.data.stats`: text and JSON output, and clean refusals."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spatialoc_ros.data.constants import CLASSES, SCENES_ALL, SCENES_TEST
from spatialoc_ros.data.loading import hint_texts, load_scene

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENE = "2013_05_28_drive_0003_sync"


def run_stats(*args):
    return subprocess.run([sys.executable, "-m", "spatialoc_ros.data.stats", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_json_output(small_city):
    res = run_stats("--base_path", small_city, "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    for key in ("scenes", "cells", "poses", "classes", "hints_per_query", "on_top_share", "matched_share",
                "described_by", "recurring_pairs"):
        assert key in st
    assert list(st["scenes"]) == list(SCENES_ALL)
    total_cells = total_poses = 0
    for scene, entry in st["scenes"].items():
        assert {"cells", "poses", "objects", "first_hint"} <= set(entry)
        data = load_scene(small_city, scene)
        assert entry["cells"] == len(data.cells) and entry["poses"] == len(data.poses)
        assert entry["objects"] == sum(len(c.objects) for c in data.cells)
        assert entry["first_hint"] == hint_texts(data.poses[0])[0]
        total_cells += entry["cells"]
        total_poses += entry["poses"]
    assert st["cells"] == total_cells and st["poses"] == total_poses
    assert set(st["classes"]) == set(CLASSES) - {"pad"}
    assert sum(st["classes"].values()) == sum(e["objects"] for e in st["scenes"].values())
    assert st["hints_per_query"] == {"6": total_poses}
    assert 0 < st["on_top_share"] < 1 and 0.5 < st["matched_share"] < 1
    assert sum(st["described_by"].values()) == total_poses
    top = st["recurring_pairs"][0]
    assert {"class", "color", "cells"} <= set(top) and top["cells"] >= st["recurring_pairs"][-1]["cells"]


def test_text_output_and_split(small_city):
    res = run_stats("--base_path", small_city, "--split", "test")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for scene in SCENES_TEST:
        data = load_scene(small_city, scene)
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(scene))
        assert f"cells {len(data.cells):6d}" in line and f"poses {len(data.poses):6d}" in line
        assert line.endswith(hint_texts(data.poses[0])[0])
    assert "2013_05_28_drive_0000_sync" not in out
    assert "on-top share" in out and "recurring class + colour pairs" in out and "hints per query: 6:" in out


def _copy_city(small_city, dst):
    shutil.copytree(small_city, dst)
    return str(dst)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _assert_one_error_line(res):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.stderr
    return lines[0]


def test_malicious_pickle_refused(small_city, tmp_path):
    base = _copy_city(small_city, tmp_path / "city")
    marker = tmp_path / "pwned"
    target = os.path.join(base, "cells", f"{SCENE}.pkl")
    with open(target, "wb") as f:
        pickle.dump([_Evil(marker)], f, protocol=4)
    res = run_stats("--base_path", base)
    line = _assert_one_error_line(res)
    assert "refused to load" in line and target in line and "system" in line
    assert not marker.exists()


def test_garbage_and_missing(small_city, tmp_path):
    res = run_stats("--base_path", str(tmp_path / "nowhere"))
    line = _assert_one_error_line(res)
    assert "nowhere" in line
    base = _copy_city(small_city, tmp_path / "city")
    target = os.path.join(base, "poses", f"{SCENE}.pkl")
    with open(target, "wb") as f:
        f.write(b"\x80\x04this is not a pickle at all")
    line = _assert_one_error_line(run_stats("--base_path", base, "--json"))
    assert target in line
    # only the val scene is read for --split val, so the broken test scene does not matter there
    assert run_stats("--base_path", base, "--split", "val").returncode == 0
    # a well-formed pickle of the wrong content
    with open(target, "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=4)
    line = _assert_one_error_line(run_stats("--base_path", base))
    assert "list of Pose" in line


@pytest.mark.parametrize("split", ["train", "val"])
def test_in_process_main(small_city, split, capsys):
    from spatialoc_ros.data import stats

    assert stats.main(["--base_path", small_city, "--split", split, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["split"] == split and st["poses"] > 0
