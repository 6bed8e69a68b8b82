"""The instruction parser inside the ROS-free core: Localizer.localize reads free text, structured
hints and the template alike through one path, and refuses what holds too little."""
import numpy as np
import pytest

from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.inference import InstructionRefused, Localizer, understand
from spatialoc_ros.language import Hint


@pytest.fixture(scope="module")
def localizer(small_city, tmp_path_factory):
    from ros_helpers import tiny_checkpoints

    loc = Localizer.from_checkpoints(*tiny_checkpoints(tmp_path_factory.mktemp("ckpt_lang")), device="cpu")
    loc.set_map(load_split(small_city, "test").cells, progress=False)
    return loc


def _same(a, b):
    assert [h.cell_id for h in a] == [h.cell_id for h in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.mean_xy, y.mean_xy, atol=1e-9)
        np.testing.assert_allclose(x.cov_xy, y.cov_xy, atol=1e-12)


def test_paraphrases_give_the_template_answer(localizer, small_city):
    pose = load_split(small_city, "test").poses[3]
    hints = [(d.direction, d.object_color_text, d.object_label) for d in pose.descriptions]
    template = localizer.localize(query_text(pose), top_k=3)
    inverse = {"north": "south", "south": "north", "east": "west", "west": "east"}
    first_person = " ".join(
        f"I am {'on' if d == 'on-top' else d + ' of'} a {c} {l}." for d, c, l in hints)
    relative = ", ".join(
        f"I'm standing on a {c} {l}" if d == "on-top" else f"there is a {c} {l} to my {inverse[d]}"
        for d, c, l in hints)
    for text in (first_person, relative, relative.upper(), relative.replace("gray", "grey")):
        _same(localizer.localize(text, top_k=3), template)
    structured = [Hint(d, c, l) for d, c, l in hints]
    _same(localizer.localize(structured, top_k=3), template)


@pytest.mark.parametrize("text, needle", [
    ("north", "no object named"),
    ("colorless green ideas sleep furiously", "understood 0 hints"),
    ("The pose is north of a gray building.", "understood 1 hint (north of a gray building)"),
    ("", "empty"),
    ("the building is to my left and the pole is behind me", "heading"),
])
def test_too_little_is_refused_with_what_was_understood(localizer, text, needle):
    with pytest.raises(InstructionRefused, match=needle.replace("(", r"\(").replace(")", r"\)")):
        localizer.localize(text)


def test_min_hints_and_colourless_hints(localizer, small_city):
    text = "I am north of a building and east of a pole"
    parsed = understand(text)
    assert [(h.direction, h.colour, h.label) for h in parsed.hints] == [("north", None, "building"), ("east", None, "pole")]
    assert len(localizer.localize(text, top_k=2)) == 2
    with pytest.raises(InstructionRefused, match="at least 3"):
        understand(text, min_hints=3)
    strict = Localizer(localizer.coarse, localizer.coarse_cfg, localizer.fine, localizer.fine_cfg, device="cpu",
                       text_encoders=localizer._hint_encoders, min_hints=3)
    strict.set_map(load_split(small_city, "test").cells[:10], progress=False)
    with pytest.raises(InstructionRefused):
        strict.localize(text)
