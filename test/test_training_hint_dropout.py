"""Hint dropout and colour dropout in the training data (QueryDataset), and their CLI flags.

Pure data logic on the small synthetic city: no model is trained.
"""
import collections

import numpy as np
import pytest

from spatialoc_ros.data.loading import hint_texts, load_split
from spatialoc_ros.language.parser import Hint, parse_instruction, render_hint
from spatialoc_ros.training.datasets import FLIPS, QueryDataset, flip_hint, flip_position

_FLIPPED = {
    None: {},
    "x": {"east": "west", "west": "east"},
    "y": {"north": "south", "south": "north"},
    "xy": {"east": "west", "west": "east", "north": "south", "south": "north"},
}


@pytest.fixture(scope="module")
def train_data(small_city):
    return load_split(small_city, "train", with_direction=False)


def _samples(ds, n=None):
    n = len(ds) if n is None else min(n, len(ds))
    return [(i, ds[i]) for i in range(n)]


def _flipped(direction, flip):
    return _FLIPPED[flip].get(direction, direction)


def test_hint_count_is_uniform_in_range(train_data):
    ds = QueryDataset(train_data, augment=True, seed=3, hint_dropout_min=3)
    counts = collections.Counter()
    for _ in range(3):
        for idx, s in _samples(ds):
            n = len(train_data.poses[idx].descriptions)
            assert min(3, n) <= len(s.hints) <= n
            assert len(s.hint_ids) == len(s.hints)
            counts[len(s.hints)] += 1
    six = [len(p.descriptions) for p in train_data.poses]
    assert set(six) == {6}, "the small city's queries are expected to carry 6 hints"
    assert set(counts) == {3, 4, 5, 6}
    total = sum(counts.values())
    for k in (3, 4, 5, 6):  # uniform: each count about a quarter
        assert 0.18 < counts[k] / total < 0.32, counts


@pytest.mark.parametrize("min_hints", [None, 6, 7])
def test_hint_dropout_off_keeps_every_hint(train_data, min_hints):
    ds = QueryDataset(train_data, augment=True, seed=0, hint_dropout_min=min_hints)
    for idx, s in _samples(ds, 200):
        assert len(s.hints) == len(train_data.poses[idx].descriptions)
        assert sorted(s.hint_ids) == list(range(len(s.hints)))


def test_hint_dropout_min_one_reaches_one_hint(train_data):
    ds = QueryDataset(train_data, augment=True, seed=0, hint_dropout_min=1)
    lengths = {len(s.hints) for _ in range(2) for _, s in _samples(ds)}
    assert lengths == {1, 2, 3, 4, 5, 6}


def test_colourless_sentence_is_exact_and_reads_back(train_data):
    ds = QueryDataset(train_data, augment=True, seed=1, hint_dropout_min=3, colour_dropout=1.0)
    seen_flips = set()
    for idx, s in _samples(ds, 300):
        seen_flips.add(s.flip)
        descr = train_data.poses[idx].descriptions
        for text, i in zip(s.hints, s.hint_ids):
            d = descr[i]
            direction = _flipped(d.direction, s.flip)
            assert text == f"The pose is {direction} of a {d.object_label}."
            assert text == render_hint(Hint(direction, None, d.object_label))
            assert d.object_color_text not in text.split(" of a ")[1]
            # what the instruction parser reads from it is exactly this hint, colour unknown
            assert list(parse_instruction(text).hints) == [Hint(direction, None, d.object_label)]
    assert seen_flips == set(FLIPS)


def test_colour_dropout_rate(train_data):
    p = 0.3
    ds = QueryDataset(train_data, augment=True, seed=2, hint_dropout_min=3, colour_dropout=p)
    dropped = kept = 0
    for _ in range(3):
        for idx, s in _samples(ds):
            descr = train_data.poses[idx].descriptions
            for text, i in zip(s.hints, s.hint_ids):
                d = descr[i]
                with_colour = flip_hint(f"The pose is {d.direction} of a {d.object_color_text} {d.object_label}.", s.flip)
                without = flip_hint(render_hint(Hint(d.direction, None, d.object_label)), s.flip)
                assert text in (with_colour, without)
                dropped += text == without
                kept += text == with_colour
    share = dropped / (dropped + kept)
    assert abs(share - p) < 0.04, share


def test_no_colour_dropout_keeps_every_colour(train_data):
    ds = QueryDataset(train_data, augment=True, seed=2, hint_dropout_min=3, colour_dropout=0.0)
    for idx, s in _samples(ds, 300):
        descr = train_data.poses[idx].descriptions
        for text, i in zip(s.hints, s.hint_ids):
            d = descr[i]
            assert text == flip_hint(f"The pose is {d.direction} of a {d.object_color_text} {d.object_label}.", s.flip)


def test_per_hint_alignment_with_descriptions(train_data):
    """hint_ids name the description each kept hint came from: distinct, in range, and the sentence is
    that description's (flipped, maybe colourless): whatever per-hint target follows hint_ids stays right."""
    ds = QueryDataset(train_data, augment=True, seed=5, hint_dropout_min=3, colour_dropout=0.5)
    orders = set()
    for idx, s in _samples(ds, 400):
        descr = train_data.poses[idx].descriptions
        assert len(set(s.hint_ids)) == len(s.hint_ids)
        assert all(0 <= i < len(descr) for i in s.hint_ids)
        orders.add(tuple(s.hint_ids))
        for text, i in zip(s.hints, s.hint_ids):
            d = descr[i]
            direction = _flipped(d.direction, s.flip)
            assert text.startswith(f"The pose is {direction} of a ")
            parsed = parse_instruction(text).hints
            assert len(parsed) == 1
            assert (parsed[0].direction, parsed[0].label) == (direction, d.object_label)
            assert parsed[0].colour in (None, d.object_color_text)
        # the target is the pose's position (flipped with the cell), whichever hints were kept
        np.testing.assert_allclose(s.target, flip_position(np.asarray(train_data.poses[idx].pose), s.flip), atol=1e-9)
    assert len(orders) > 100, "hints are not shuffled"


def test_validation_is_unaffected(train_data):
    """augment=False (validation): all hints, in order, with colour, whatever the dropout settings."""
    plain = QueryDataset(train_data, augment=False, seed=0)
    ds = QueryDataset(train_data, augment=False, seed=0, hint_dropout_min=1, colour_dropout=1.0)
    for idx in range(len(ds)):
        a, b = ds[idx], plain[idx]
        assert a.hints == b.hints == hint_texts(train_data.poses[idx])
        assert a.hint_ids == list(range(len(a.hints)))
        assert a.flip is None
        np.testing.assert_array_equal(a.target, b.target)


def test_determinism_with_a_seed(train_data):
    def run(seed):
        ds = QueryDataset(train_data, augment=True, seed=seed, hint_dropout_min=3, colour_dropout=0.3)
        return [(s.hints, s.hint_ids, s.flip) for _, s in _samples(ds, 200)]

    assert run(11) == run(11)
    assert run(11) != run(12)
    ds = QueryDataset(train_data, augment=True, seed=0, hint_dropout_min=3, colour_dropout=0.3)
    ds.reseed(11)
    assert [(s.hints, s.hint_ids, s.flip) for _, s in _samples(ds, 200)] == run(11)


def test_flags_off_reproduce_the_old_stream(train_data):
    """With both augmentations off the random stream (shuffle, flip) is the one the shipped models saw."""
    a = QueryDataset(train_data, augment=True, seed=4)
    b = QueryDataset(train_data, augment=True, seed=4, hint_dropout_min=6, colour_dropout=0.0)
    rng = np.random.default_rng(4)
    for idx in range(100):
        sa, sb = a[idx], b[idx]
        perm = rng.permutation(len(train_data.poses[idx].descriptions))
        flip = FLIPS[int(rng.integers(len(FLIPS)))]
        expect = [flip_hint(hint_texts(train_data.poses[idx])[i], flip) for i in perm]
        assert sa.hints == sb.hints == expect
        assert sa.flip == sb.flip == flip


@pytest.mark.parametrize("kwargs", [{"hint_dropout_min": 0}, {"hint_dropout_min": 2.5}, {"hint_dropout_min": True},
                                    {"colour_dropout": -0.1}, {"colour_dropout": 1.5}])
def test_bad_values_are_refused(train_data, kwargs):
    with pytest.raises(ValueError):
        QueryDataset(train_data, augment=True, **kwargs)


# --- the flags -----------------------------------------------------------------------------------------
def _parse(stage, argv, tmp_path):
    from spatialoc_ros.training import args as targs
    from spatialoc_ros.training import coarse, fine

    parser = (coarse if stage == "coarse" else fine).build_parser()
    args = parser.parse_args(["--checkpoint_root", str(tmp_path), *argv])
    targs.check_common(args, parser)
    return args


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_flag_defaults_and_values(stage, tmp_path):
    from spatialoc_ros.training.args import COLOUR_DROPOUT_DEFAULT

    args = _parse(stage, [], tmp_path)
    assert args.hint_dropout_min == 3 and args.colour_dropout == COLOUR_DROPOUT_DEFAULT
    assert 0 < COLOUR_DROPOUT_DEFAULT < 1
    args = _parse(stage, ["--hint_dropout_min", "6", "--colour_dropout", "0"], tmp_path)
    assert args.hint_dropout_min == 6 and args.colour_dropout == 0.0


@pytest.mark.parametrize("argv", [["--hint_dropout_min", "0"], ["--hint_dropout_min", "7"],
                                  ["--hint_dropout_min", "two"], ["--colour_dropout", "1.2"],
                                  ["--colour_dropout", "-0.5"], ["--colour_dropout", "nan"]])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("coarse", argv, tmp_path)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_trainers_pass_the_flags_to_the_dataset(stage, small_city, tmp_path, monkeypatch):
    import torch

    from spatialoc_ros.training import coarse, fine

    module = coarse if stage == "coarse" else fine
    seen = {}

    def fake_dataset(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(module, "QueryDataset", fake_dataset)
    argv = ["--base_path", small_city, "--checkpoint_root", str(tmp_path), "--epochs", "1", "--no_progress",
            "--device", "cpu", "--threads", "1", "--hint_dropout_min", "4", "--colour_dropout", "0.25"]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_Stop):
            module.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert seen["hint_dropout_min"] == 4 and seen["colour_dropout"] == 0.25
