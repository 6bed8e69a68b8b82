"""The benchmark scripts run end to end on small sizes (they print figures; nothing here times them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_dry_run_on_cpu(tmp_path, small_city):
    out = tmp_path / "gpu.json"
    proc = _run([str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--dry_run",
                 "--base_path", small_city, "--out_json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    assert report["differences"]["descriptor"] == 0.0  # CPU against CPU: exactly the same
    assert [m["cells"] for m in report["maps"]] == [200, 1000]
    assert {e["encoder"].split(",")[0] for e in report["encoders"]} >= {"MiniLM-L6 (shipped)"}
    assert "all comparisons within tolerance" in proc.stdout


def test_gpu_check_refuses_a_missing_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _run([str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cuda"], tmp_path, timeout=120)
    assert proc.returncode == 2 and "dry run" in proc.stderr


def test_latency_benchmark_small(tmp_path, small_city):
    pytest.importorskip("faiss")
    out = tmp_path / "lat.json"
    proc = _run([str(REPO_ROOT / "benchmarks" / "latency.py"), "--device", "cpu", "--base_path", small_city,
                 "--cells", "150", "--index_only", "3000", "--queries", "3", "--out_json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    row = report["full"][0]
    assert row["cells"] == 150 and row["restart_from_cache"] is True
    assert 0.0 <= row["faiss_recall_at_10"] <= 1.0 and row["bytes_per_cell"] > 0
    assert report["index_only"][0]["cells"] == 3000


def test_train_throughput_side_by_side_and_full_size(tmp_path, small_city):
    """The side-by-side mode (two worker processes, alternating rounds) on this tree against
    itself, and the seed's full-size configs built from the training CLIs' flags."""
    script = str(REPO_ROOT / "benchmarks" / "train_throughput.py")
    proc = _run([script, "--base_path", small_city, "--device", "cpu", "--ref_tree", str(REPO_ROOT),
                 "--rounds", "2", "--batches", "1", "--warmup", "1", "--coarse_batch_size", "8",
                 "--fine_batch_size", "8"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("coarse", "fine"):
        assert proc.stdout.count(f"{stage} old total:") == 1 and f"{stage}: new / old = " in proc.stdout
    assert proc.stdout.count("round 2") == 4
    proc = _run([script, "--base_path", small_city, "--device", "cpu", "--size", "full", "--stages", "fine",
                 "--batches", "1", "--warmup", "0", "--fine_batch_size", "2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embed 128, 256 points, 28 objects, pointnet2 PointNet 256-d" in proc.stdout
