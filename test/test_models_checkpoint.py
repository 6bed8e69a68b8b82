"""Checkpoints: weights-only round trip and clear errors."""
import dataclasses

import pytest
import torch

from spatialoc_ros.models import (
    CheckpointError,
    CoarseConfig,
    FineConfig,
    build_coarse_model,
    build_fine_model,
    load_checkpoint,
    save_checkpoint,
)
from spatialoc_ros.models.random_inputs import random_cell_batch, random_hint_batch

torch.set_num_threads(1)
COARSE = CoarseConfig(text_dim=12, embed_dim=16, num_points=8, max_objects=5, pointnet_dim=8,
                      num_hidden_layers=1, num_heads=2, beose_dim=4)
FINE = FineConfig(text_dim=12, embed_dim=16, num_points=8, max_objects=5, pointnet_dim=8, num_layers=1, num_heads=2)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return random_hint_batch(3, num_hints=3, num_tokens=5, dim=12, generator=g), \
        random_cell_batch(3, max_objects=5, num_points=8, generator=g)


@pytest.fixture
def coarse_file(tmp_path):
    torch.manual_seed(0)
    model = build_coarse_model(COARSE).eval()
    path = tmp_path / "coarse.pth"
    save_checkpoint(str(path), model, COARSE, "coarse", {"epoch": 3, "recall": [0.1, 0.2], "note": None})
    return path, model


def test_coarse_round_trip_gives_identical_outputs(coarse_file, inputs):
    path, model = coarse_file
    loaded, cfg, extra = load_checkpoint(str(path), "coarse", device="cpu")
    assert cfg == COARSE and extra == {"epoch": 3, "recall": [0.1, 0.2], "note": None}
    assert not loaded.training
    hints, cells = inputs
    with torch.no_grad():
        a = model.similarity(model.encode_text(hints), model.encode_cells(cells))
        b = loaded.similarity(loaded.encode_text(hints), loaded.encode_cells(cells))
    for level in a:
        assert torch.equal(a[level], b[level])
    raw = torch.load(str(path), weights_only=True)
    assert raw["version"] == 1 and raw["kind"] == "coarse" and raw["config"]["text_dim"] == 12


def test_fine_round_trip(tmp_path, inputs):
    model = build_fine_model(FINE).eval()
    save_checkpoint(str(tmp_path / "fine.pth"), model, FINE, "fine", {})
    loaded, cfg, _ = load_checkpoint(str(tmp_path / "fine.pth"), "fine")
    assert cfg == FINE
    with torch.no_grad():
        a, b = model(*inputs), loaded(*inputs)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.scale_tril, b.scale_tril)


def test_wrong_kind_is_refused(coarse_file):
    with pytest.raises(CheckpointError, match="'coarse' checkpoint, but a 'fine'"):
        load_checkpoint(str(coarse_file[0]), "fine")


def test_save_validates(tmp_path):
    model = build_coarse_model(COARSE)
    with pytest.raises(TypeError, match="CoarseConfig"):
        save_checkpoint(str(tmp_path / "x.pth"), model, FINE, "coarse", {})
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(str(tmp_path / "x.pth"), model, COARSE, "coarse", {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(str(tmp_path / "x.pth"), model, COARSE, "medium", {})
    assert not any(tmp_path.iterdir())  # nothing half-written


def _tamper(path, edit):
    payload = torch.load(str(path), weights_only=True)
    edit(payload)
    torch.save(payload, str(path))


@pytest.mark.parametrize("edit,match", [
    (lambda p: p["model"].pop(next(iter(p["model"]))), "do not match"),
    (lambda p: p["model"].__setitem__("extra.weight", torch.zeros(2)), "do not match"),
    (lambda p: p["model"].__setitem__("text_object_head.weight", torch.zeros(3, 3)), "do not match"),
    (lambda p: p["config"].__setitem__("embed_dim", 32), "do not match"),
    (lambda p: p["config"].__setitem__("colour", 1), "does not know"),
    (lambda p: p["config"].__setitem__("ranking_loss", "triplet"), "invalid CoarseConfig"),
    (lambda p: p.__setitem__("version", 2), "version 2"),
    (lambda p: p.pop("kind"), "lacks the keys"),
])
def test_tampered_checkpoints_raise_clear_errors(coarse_file, edit, match):
    path = coarse_file[0]
    _tamper(path, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(str(path), "coarse")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pth"), "coarse")
    whole = tmp_path / "whole_model.pth"
    torch.save(build_fine_model(FINE), str(whole))  # a pickled module, as the public release ships
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(str(whole), "fine")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(garbage), "fine")


def test_config_text_dim_must_match_encoder():
    with pytest.raises(ValueError, match="text_dim"):
        build_coarse_model(COARSE, text_dim=384)
    assert dataclasses.asdict(COARSE)["use_features"] == ["class", "color", "position", "num"]
