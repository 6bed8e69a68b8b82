"""The training and evaluation CLIs end to end (subprocesses, the seed README's flag spellings) on a
small synthetic city with tiny models, plus resume and the non-finite-loss stop."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num_points", "8", "--max_objects", "12", "--pointnet_dim", "16", "--dropout", "0",
        "--device", "cpu", "--no_progress", "--threads", "1"]


def _run(module: str, args: list[str], cwd: Path, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect_rc, f"{module} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _coarse_args(city: str) -> list[str]:
    # the seed README's coarse command, with tiny sizes and --max_batches on top
    return ["--batch_size", "8", "--coarse_embed_dim", "16", "--shuffle", "--base_path", city,
            "--use_features", "class", "color", "position", "num", "--no_pc_augment", "--fixed_embedding",
            "--epochs", "1", "--learning_rate", "0.0001", "--lr_scheduler", "step", "--lr_step", "5",
            "--lr_gamma", "0.5", "--temperature", "0.05", "--ranking_loss", "CCL", "--num_of_hidden_layer", "1",
            "--alpha", "2", "--hungging_model", "minilm", "--folder_name", "coarse_run",
            "--max_batches", "2", "--num_heads", "2", "--beose_dim", "8", "--bezier_samples", "2", *TINY]


def _fine_args(city: str) -> list[str]:
    # the seed README's fine command (--fixed_embedding given twice, as there)
    return ["--batch_size", "8", "--fine_embed_dim", "16", "--shuffle", "--base_path", city,
            "--use_features", "class", "color", "position", "num", "--no_pc_augment", "--fixed_embedding",
            "--epochs", "1", "--learning_rate", "0.0003", "--fixed_embedding", "--hungging_model", "minilm",
            "--regressor_cell", "all", "--pmc_prob", "0.5", "--folder_name", "fine_run",
            "--max_batches", "2", "--fine_num_layers", "1", "--fine_num_heads", "2",
            "--calibrate_sigma", "val", *TINY]


@pytest.fixture(scope="module")
def runs(small_city, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    _run("spatialoc_ros.training.coarse", _coarse_args(small_city), work)
    _run("spatialoc_ros.training.fine", _fine_args(small_city), work)
    return work


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_writes_checkpoints_and_metrics(runs):
    from spatialoc_ros.models.checkpoint import load_checkpoint

    for run, kind in (("coarse_run", "coarse"), ("fine_run", "fine")):
        folder = runs / "checkpoints" / run
        for name in ("best.pth", "last.pth", "last.state.pth", "metrics.csv", "args.json"):
            assert (folder / name).is_file(), f"{run}/{name} missing"
        model, cfg, extra = load_checkpoint(str(folder / "best.pth"), kind, "cpu")
        assert cfg.text_model == "minilm" and cfg.text_dim == 384 and cfg.num_points == 8
        assert extra["epoch"] == 1 and extra["max_tokens"] == 32
        rows = _csv_rows(folder / "metrics.csv")
        assert len(rows) == 1 and rows[0]["epoch"] == "1"
    coarse_rows = _csv_rows(runs / "checkpoints" / "coarse_run" / "metrics.csv")
    for k in (1, 3, 5):
        assert 0.0 <= float(coarse_rows[0][f"val_recall@{k}"]) <= 1.0
    fine_rows = _csv_rows(runs / "checkpoints" / "fine_run" / "metrics.csv")
    assert float(fine_rows[0]["val_mean_error_m"]) > 0
    _, cfg, extra = load_checkpoint(str(runs / "checkpoints" / "fine_run" / "best.pth"), "fine", "cpu")
    assert cfg.regressor_cell == "all" and cfg.fine_loss == "nll"
    assert extra["sigma_scale"] > 0 and "val_calibrated" in extra
    # coarse training ends with the retrieval calibration on val (relation weight, temperature)
    _, _, extra = load_checkpoint(str(runs / "checkpoints" / "coarse_run" / "best.pth"), "coarse", "cpu")
    assert extra["relation_weight"] >= 0 and extra["temperature"] > 0
    assert extra["calibration"]["val_recall@1"] >= extra["calibration"]["val_recall@1_learned_only"]


def test_pipeline_and_coarse_evaluation(runs, small_city):
    ckpt = runs / "checkpoints"
    out = runs / "pipeline.json"
    proc = _run("spatialoc_ros.evaluation.pipeline", [
        "--base_path", small_city, "--use_features", "class", "color", "position", "num", "--use_test_set",
        "--no_pc_augment", "--no_pc_augment_fine", "--hungging_model", "minilm", "--fixed_embedding",
        "--path_coarse", str(ckpt / "coarse_run" / "best.pth"), "--path_fine", str(ckpt / "fine_run" / "best.pth"),
        "--out_json", str(out), "--plots_dir", str(runs / "plots"), "--device", "cpu", "--no_progress",
    ], runs)
    assert "Coarse retrieval recall" in proc.stdout and "top-10" in proc.stdout and "1-sigma" in proc.stdout
    res = json.loads(out.read_text())
    assert res["split"] == "test" and res["num_queries"] > 0
    assert set(res["coarse_recall"]) == {"1", "3", "5"}
    assert set(res["localization_recall"]) == {"1", "5", "10"}
    for k, row in res["localization_recall"].items():
        assert set(row) == {"5.0", "10.0", "15.0"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # recall can only grow with k and with the threshold
    lr = res["localization_recall"]
    assert lr["1"]["5.0"] <= lr["10"]["5.0"] <= lr["10"]["15.0"]
    gt = res["calibration"]["ground_truth_cell"]
    assert gt["n"] == res["num_queries"]
    assert gt["coverage"]["1"] <= gt["coverage"]["2"] <= gt["coverage"]["3"]
    for png in res["plots"]:
        assert Path(png).is_file()
    assert len(res["plots"]) == 3 and res["plots"][-1].endswith("reliability.png")
    # the estimate, the confidence, the baseline, the flip control and the hint-count split
    est = res["estimate"]
    assert est["n"] == res["num_queries"] and 0 <= est["ece"] <= 1
    assert est["coverage"]["1"] <= est["coverage"]["2"] <= est["coverage"]["3"]
    assert set(res["baseline_bag_of_objects"]["coarse_recall"]) == {"1", "3", "5"}
    assert 0 <= res["flip_control"]["coarse_recall"]["1"] <= 1
    assert set(res["by_hint_count"]) == {"3", "4", "5", "6"}

    out = runs / "coarse.json"
    _run("spatialoc_ros.evaluation.coarse", [
        "--base_path", small_city, "--use_features", "class", "color", "position", "num", "--no_pc_augment",
        "--hungging_model", "minilm", "--fixed_embedding", "--path_coarse", str(ckpt / "coarse_run" / "best.pth"),
        "--out_json", str(out), "--device", "cpu", "--no_progress",
    ], runs)
    res = json.loads(out.read_text())
    assert res["split"] == "val" and set(res["coarse_recall"]) == {"1", "3", "5"}


def test_resume_continues_the_run(runs, small_city):
    folder = runs / "checkpoints" / "coarse_run"
    args = _coarse_args(small_city)
    args[args.index("--epochs") + 1] = "2"
    _run("spatialoc_ros.training.coarse", [*args, "--resume", str(folder / "last.pth")], runs)
    rows = _csv_rows(folder / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    from spatialoc_ros.models.checkpoint import load_checkpoint

    assert load_checkpoint(str(folder / "last.pth"), "coarse", "cpu")[2]["epoch"] == 2


def test_bad_flags_are_refused(runs, small_city):
    proc = _run("spatialoc_ros.training.fine", [*_fine_args(small_city), "--fine_loss", "l1"], runs, expect_rc=2)
    assert "--fine_loss" in proc.stderr
    proc = _run("spatialoc_ros.training.coarse", [*_coarse_args(small_city), "--ranking_loss", "triplet"], runs, expect_rc=2)
    assert "--ranking_loss" in proc.stderr


def test_non_finite_loss_stops_training(small_city, tmp_path, monkeypatch, capsys):
    """A NaN loss term stops training with a message naming the epoch, batch and term."""
    import torch

    from spatialoc_ros.training import fine

    def nan_terms(gaussian, matching, target, cfg):
        return {"nll": gaussian.mean.sum() * float("nan")}

    monkeypatch.setattr(fine, "loss_terms", nan_terms)
    monkeypatch.chdir(tmp_path)
    args = [a for a in _fine_args(small_city) if a != "--calibrate_sigma" and a != "val"]
    threads = torch.get_num_threads()
    try:
        rc = fine.main(args)
    finally:
        torch.set_num_threads(threads)  # main() applied --threads to this process
    err = capsys.readouterr().err
    assert rc == 3
    assert "non-finite loss in epoch 1, batch 1" in err and "'nll'" in err
    assert not (tmp_path / "checkpoints" / "fine_run" / "best.pth").exists()


def test_flip_swaps_direction_words_and_mirrors_target():
    from spatialoc_ros.training.datasets import flip_hint, flip_position

    hint = "The pose is east of a gray building."
    assert flip_hint(hint, "x") == "The pose is west of a gray building."
    assert flip_hint(hint, "y") == hint
    assert flip_hint("The pose is north of a black pole.", "xy") == "The pose is south of a black pole."
    assert flip_hint("The pose is on-top of a gray road.", "xy") == "The pose is on-top of a gray road."
    assert list(flip_position([0.2, 0.7], "x")) == [0.8, 0.7]
    assert list(flip_position([0.2, 0.75], "xy")) == [0.8, 0.25]


def test_unique_cell_batches():
    from spatialoc_ros.training.datasets import UniqueCellBatchSampler

    ids = ["a", "a", "a", "b", "b", "c", "d", "e"]
    batches = list(UniqueCellBatchSampler(ids, batch_size=3, shuffle=True, seed=1))
    for batch in batches:
        assert len({ids[i] for i in batch}) == len(batch) >= 2
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used))
    assert len(used) >= len(ids) - 1  # at most the last lone sample is dropped


def test_map_cloning_candidates_and_missing_direction(small_city, caplog):
    import numpy as np

    from spatialoc_ros.data.loading import load_split
    from spatialoc_ros.training.datasets import QueryDataset, position_in_cell

    data = load_split(small_city, "train")
    assert data.direction_map is not None
    ds = QueryDataset(data, augment=False, pmc_prob=1.0, seed=0)
    found = 0
    for idx in range(len(ds)):
        for cell_id, weight in ds.clone_candidates(idx):
            pos = position_in_cell(data.poses[idx], data.cells_dict[cell_id])
            assert np.all(pos >= 0) and np.all(pos <= 1) and weight > 0
            assert cell_id != data.poses[idx].cell_id
            found += 1
        sample = ds[idx]
        np.testing.assert_allclose(sample.target, position_in_cell(data.poses[idx], sample.cell))
        if not sample.cloned:  # in the best cell the target is the pose's own normalised position
            np.testing.assert_allclose(sample.target, np.asarray(data.poses[idx].pose)[0:2], atol=1e-9)
        assert sample.cloned == bool(ds.clone_candidates(idx))
    assert found > 0, "no neighbour qualified for map cloning in the small city"

    no_dir = load_split(small_city, "train", with_direction=False)
    with caplog.at_level("WARNING"):
        ds = QueryDataset(no_dir, augment=False, pmc_prob=0.5)
    assert ds.pmc_prob == 0.0
    assert "direction" in caplog.text
