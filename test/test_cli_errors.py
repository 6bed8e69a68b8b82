"""User errors of the command-line tools: one line on stderr, a non-zero exit, no traceback; output
paths are checked before the work starts; numeric flags are range-checked, NaN included."""
import os
import stat
import subprocess
import sys

import pytest

CASES = {
    "synthetic negative seed": ("spatialoc_ros.data.synthetic", ["--out", "{tmp}/c", "--seed", "-1", "--scale", "small"],
                                "--seed"),
    "synthetic unwritable out": ("spatialoc_ros.data.synthetic", ["--out", "{file}/city", "--scale", "small"], "--out"),
    "eval threshs nan": ("spatialoc_ros.evaluation.pipeline", ["--threshs", "nan", "--base_path", "{city}"], "--threshs"),
    "eval unwritable out_json": ("spatialoc_ros.evaluation.pipeline", ["--out_json", "{file}/x.json", "--base_path", "{city}"],
                                 "--out_json"),
    "eval unwritable plots": ("spatialoc_ros.evaluation.pipeline", ["--plots_dir", "{file}/plots", "--base_path", "{city}"],
                              "--plots_dir"),
    "eval random fine": ("spatialoc_ros.evaluation.pipeline", ["--path_fine", "{random}", "--base_path", "{city}"],
                         "cannot be read"),
    "eval coarse top_k 0": ("spatialoc_ros.evaluation.coarse", ["--top_k", "0", "--base_path", "{city}"], "--top_k"),
    "train lr nan": ("spatialoc_ros.training.coarse", ["--learning_rate", "nan", "--base_path", "{city}"], "--learning_rate"),
    "train lr inf": ("spatialoc_ros.training.fine", ["--learning_rate", "inf", "--base_path", "{city}"], "--learning_rate"),
    "train resume random": ("spatialoc_ros.training.coarse", ["--resume", "{random}", "--base_path", "{city}",
                                                              "--checkpoint_root", "{tmp}/ck"], "cannot be read"),
    "train unwritable root": ("spatialoc_ros.training.fine", ["--checkpoint_root", "{file}/ck", "--base_path", "{city}"],
                              "--checkpoint_root"),
    "train pmc_prob 2": ("spatialoc_ros.training.fine", ["--pmc_prob", "2", "--base_path", "{city}"], "--pmc_prob"),
    "train bad device": ("spatialoc_ros.training.coarse", ["--device", "tpu", "--base_path", "{city}"], "--device"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_errors_are_one_line_without_traceback(case, tmp_path, small_city):
    module, argv, needle = CASES[case]
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a folder")
    random = tmp_path / "random.pth"
    random.write_bytes(os.urandom(3000))
    argv = [a.format(tmp=tmp_path, file=regular_file, city=small_city, random=random) for a in argv]
    run = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 2, (run.returncode, run.stdout[-1000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "error:" in last and needle in last, run.stderr
    assert "[eval] " not in run.stdout and "[train] epoch" not in run.stdout  # refused before the work


def test_the_default_city_cache_is_readable_by_others(tmp_path, monkeypatch):
    from spatialoc_ros.data import synthetic

    real = synthetic.generate_city
    monkeypatch.setattr(synthetic, "generate_city", lambda out, **kw: real(out, **{**kw, "scale": "small"}))
    monkeypatch.setenv("SPATIALOC_DATA_DIR", str(tmp_path))
    path = synthetic.ensure_default_city(log=None)
    modes = []
    for root, dirs, files in os.walk(path):
        modes.append(stat.S_IMODE(os.stat(root).st_mode) == 0o755)
        modes += [stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o644 for f in files]
    assert modes and all(modes)
