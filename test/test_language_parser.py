"""The instruction parser: free text -> the data set's hint sentences (spatialoc_ros.language)."""
import math

import pytest

from spatialoc_ros.data.constants import CLASSES, PAD_LABEL, UNIQUE_COLOR_NAMES
from spatialoc_ros.language import (
    Hint,
    ParsedInstruction,
    check_hints,
    parse_instruction,
    render_hint,
    render_hints,
    split_clauses,
)
from spatialoc_ros.language.vocabulary import CLASS_SYNONYMS, COLOUR_SYNONYMS, singular


def hints_of(text, heading_yaw=None):
    return parse_instruction(text, heading_yaw=heading_yaw).hints


def one(text, heading_yaw=None):
    parsed = parse_instruction(text, heading_yaw=heading_yaw)
    assert len(parsed.hints) == 1, parsed.describe()
    return parsed.hints[0]


# --- rendering -----------------------------------------------------------------------------------------
def test_render_hint_is_the_training_sentence():
    assert render_hint(Hint("north", "gray", "building")) == "The pose is north of a gray building."
    assert (render_hint(Hint("on-top", "bright-gray", "traffic light"))
            == "The pose is on-top of a bright-gray traffic light.")
    assert render_hint(Hint("west", None, "pole")) == "The pose is west of a pole."
    assert render_hints([Hint("east", "black", "box"), Hint("south", None, "road")]) == [
        "The pose is east of a black box.", "The pose is south of a road."]


@pytest.mark.parametrize("args", [("northeast", "gray", "building"), ("north", "red", "building"),
                                  ("north", "gray", "car"), ("north", "gray", "pad")])
def test_hint_rejects_values_outside_the_vocabulary(args):
    with pytest.raises(ValueError):
        Hint(*args)


# --- the data set's own template -------------------------------------------------------------------
def test_template_round_trip_every_class_colour_direction():
    sentences = [f"The pose is {d} of a {c} {label}."
                 for label in CLASSES if label != PAD_LABEL
                 for c in UNIQUE_COLOR_NAMES
                 for d in ("north", "south", "east", "west", "on-top")]
    text = " ".join(sentences)
    parsed = parse_instruction(text)
    assert render_hints(parsed.hints) == sentences
    assert parsed.unread == () and parsed.refused == ()


def test_template_round_trip_on_the_small_city(small_city):
    from spatialoc_ros.data.loading import hint_texts, load_split, query_text

    data = load_split(small_city, "all")
    assert len(data.poses) > 50
    for pose in data.poses:
        parsed = parse_instruction(query_text(pose))
        assert render_hints(parsed.hints) == hint_texts(pose), query_text(pose)
        assert parsed.unread == () and parsed.refused == ()
        assert [(h.direction, h.colour, h.label) for h in parsed.hints] == [
            (d.direction, d.object_color_text, d.object_label) for d in pose.descriptions]


def test_template_without_periods_and_in_lower_case():
    text = "the pose is north of a gray building the pose is on-top of a black road the pose is west of a pole"
    assert hints_of(text) == (Hint("north", "gray", "building"), Hint("on-top", "black", "road"),
                              Hint("west", None, "pole"))


# --- clause splitting ----------------------------------------------------------------------------------
def test_split_clauses_at_punctuation_and_words_keeps_decimals():
    text = "A; b, c! d? e\nf and g then h also i. j 5.5 m"
    assert split_clauses(text) == ["A", "b", "c", "d", "e", "f", "g", "h", "i", "j 5.5 m"]
    assert split_clauses("Andrew thenceforth") == ["Andrew thenceforth"]


@pytest.mark.parametrize("text", [
    "I am north of a gray building, west of a black pole; on a road",
    "I am north of a gray building and west of a black pole then on a road",
    "I am north of a gray building! West of a black pole? Also on a road.",
    "I am north of a gray building\nwest of a black pole\non a road",
])
def test_separators(text):
    assert hints_of(text) == (Hint("north", "gray", "building"), Hint("west", "black", "pole"),
                              Hint("on-top", None, "road"))


# --- subject-relative forms keep the direction ---------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("I am north of a gray building", Hint("north", "gray", "building")),
    ("I'm just east of the green pole", Hint("east", "green", "pole")),
    ("the robot is south of a tree", Hint("south", None, "vegetation")),
    ("We're west of the lamp", Hint("west", None, "lamp")),
    ("we are to the north of some buildings", Hint("north", None, "building")),
    ("My position is slightly north of a box", Hint("north", None, "box")),
    ("The position is east of a black wall", Hint("east", "black", "wall")),
    ("The pose is west of a beige fence", Hint("west", "beige", "fence")),
    ("You are on the north side of the parking lot", Hint("north", None, "parking")),
    ("east of a green pole", Hint("east", "green", "pole")),
    ("just south of the bridge", Hint("south", None, "bridge")),
    ("I'm about 5 m west of a trash can", Hint("west", None, "trash bin")),
    ("roughly 10 meters south of a traffic light", Hint("south", None, "traffic light")),
    ("I am directly north of a garage", Hint("north", None, "garage")),
    ("maybe a bit east of the tunnel", Hint("east", None, "tunnel")),
    ("I think I'm right north of a hedge", Hint("north", None, "vegetation")),
    ("NORTH OF A GRAY BUILDING", Hint("north", "gray", "building")),
])
def test_pose_relative_forms(text, expected):
    assert one(text) == expected


def test_second_clause_without_subject_is_pose_relative():
    assert hints_of("I am north of a gray building and east of a green pole") == (
        Hint("north", "gray", "building"), Hint("east", "green", "pole"))


# --- object-relative forms invert the direction --------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("There is a gray building to my south", Hint("north", "gray", "building")),
    ("A gray pole is east of me", Hint("west", "gray", "pole")),
    ("To the south of me is a beige wall", Hint("north", "beige", "wall")),
    ("A fence lies to the north", Hint("south", None, "fence")),
    ("The fence is north", Hint("south", None, "fence")),
    ("there's a lamp post west of us", Hint("east", None, "lamp")),
    ("I see some trees to the east", Hint("west", None, "vegetation")),
    ("a black box is just north of the robot", Hint("south", "black", "box")),
    ("The sidewalk is south of my position", Hint("north", None, "sidewalk")),
    ("North of me there is a garage", Hint("south", None, "garage")),
    ("with a stop sign to the robot's west", Hint("east", None, "stop")),
    ("a road about 5 m to my north", Hint("south", None, "road")),
])
def test_object_relative_forms(text, expected):
    assert one(text) == expected


def test_two_object_relative_hints_split_at_and():
    assert hints_of("a gray building to my east and a green pole north of me") == (
        Hint("west", "gray", "building"), Hint("south", "green", "pole"))


def test_mixed_clause_on_top_and_object_relative():
    text = "I'm on the sidewalk with a tall grey building right to my east and a green pole just north of me"
    assert hints_of(text) == (Hint("on-top", None, "sidewalk"), Hint("west", "gray", "building"),
                              Hint("south", "green", "pole"))


# --- on-top forms --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, label", [
    ("I am on the sidewalk", "sidewalk"),
    ("standing on a road", "road"),
    ("The robot is on top of the wall", "wall"),
    ("The pose is on-top of a gray road", "road"),
    ("I'm over the tunnel", "tunnel"),
    ("above the parking", "parking"),
    ("I am under the bridge", "bridge"),
    ("The road is under me", "road"),
    ("grass is below us", "terrain"),
    ("a bridge overhead", "bridge"),
])
def test_on_top_forms(text, label):
    h = one(text)
    assert (h.direction, h.label) == ("on-top", label)


def test_on_the_left_is_not_on_top():
    parsed = parse_instruction("a tree is on my left")
    assert parsed.hints == () and len(parsed.refused) == 1


def test_object_on_another_object_is_not_an_on_top_hint():
    parsed = parse_instruction("a lamp on the sidewalk is north of me")
    assert parsed.hints == (Hint("south", None, "lamp"),)


# --- words: case, articles, plurals, hedges -------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "The pose is north of a gray building.", "the pose is north of the gray building",
    "THE POSE IS NORTH OF AN GRAY BUILDING", "I am north of some gray buildings",
    "I'm just north of a grey building", "i am right north of a gray building",
    "I am directly north of a gray building", "I am slightly north of one gray building",
    "maybe I am a bit north of a gray building",
])
def test_case_articles_plurals_hedges(text):
    assert one(text) == Hint("north", "gray", "building")


@pytest.mark.parametrize("word, single", [("trees", "tree"), ("bushes", "bush"), ("boxes", "box"),
                                          ("poles", "pole"), ("grass", "grass"), ("bus", "bus"),
                                          ("shrubberies", "shrubbery")])
def test_singular(word, single):
    assert singular(word) == single


# --- compound directions -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["I'm northeast of a pole", "a building to the north-east",
                                  "a lamp is south west of me", "I am to the NORTH-WEST of a tree"])
def test_compound_directions_are_refused_with_a_reason(text):
    parsed = parse_instruction(text)
    assert parsed.hints == ()
    assert len(parsed.refused) == 1 and "between two directions" in parsed.refused[0]
    assert text in parsed.refused[0]


# --- colours -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phrase, colour", [
    ("gray", "gray"), ("grey", "gray"), ("greyish", "gray"),
    ("dark green", "dark-green"), ("dark-green", "dark-green"),
    ("gray green", "gray-green"), ("grey-green", "gray-green"), ("greyish green", "gray-green"),
    ("bright gray", "bright-gray"), ("light grey", "bright-gray"), ("light gray", "bright-gray"),
    ("silver", "bright-gray"), ("white", "bright-gray"), ("cream", "bright-gray"),
    ("black", "black"), ("dark", "black"), ("charcoal", "dark-green"), ("dark grey", "gray-green"),
    ("green", "green"), ("light green", "green"), ("beige", "beige"), ("tan", "beige"), ("khaki", "beige"),
])
def test_colour_synonyms(phrase, colour):
    assert one(f"I am west of a {phrase} wall") == Hint("west", colour, "wall")


def test_colour_table_only_names_data_set_colours():
    assert set(COLOUR_SYNONYMS.values()) == set(UNIQUE_COLOR_NAMES)


def test_unknown_colour_keeps_the_object_without_colour():
    assert one("I am west of a red wall") == Hint("west", None, "wall")


def test_colour_omitted_keeps_the_hint():
    assert one("north of a building") == Hint("north", None, "building")


# --- classes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phrase, label", [
    ("tree", "vegetation"), ("bush", "vegetation"), ("hedge", "vegetation"), ("plants", "vegetation"),
    ("grass", "terrain"), ("lawn", "terrain"), ("meadow", "terrain"),
    ("house", "building"), ("shop", "building"), ("store", "building"), ("office", "building"),
    ("street", "road"), ("lane", "road"), ("pavement", "sidewalk"), ("footpath", "sidewalk"),
    ("walkway", "sidewalk"), ("bin", "trash bin"), ("trash can", "trash bin"), ("garbage can", "trash bin"),
    ("litter bin", "trash bin"), ("street light", "lamp"), ("streetlight", "lamp"), ("lamppost", "lamp"),
    ("lamp post", "lamp"), ("traffic signal", "traffic light"), ("traffic light", "traffic light"),
    ("sign", "traffic sign"), ("road sign", "traffic sign"), ("car park", "parking"),
    ("parking lot", "parking"), ("post", "smallpole"), ("bollard", "smallpole"), ("small pole", "smallpole"),
    ("stop sign", "stop"), ("bus stop", "stop"), ("railing", "guard rail"), ("guardrail", "guard rail"),
    ("guard-rail", "guard rail"), ("carport", "garage"), ("vending machine", "vending machine"),
    ("trash bins", "trash bin"), ("traffic lights", "traffic light"), ("lamp posts", "lamp"),
])
def test_class_synonyms(phrase, label):
    assert one(f"I am east of a gray {phrase}") == Hint("east", "gray", label)


def test_every_class_is_reachable_by_its_own_name():
    assert {CLASS_SYNONYMS[c] for c in CLASSES if c != PAD_LABEL} == set(CLASSES) - {PAD_LABEL}


def test_multi_word_classes_win_over_their_words():
    assert one("north of a stop light") == Hint("north", None, "traffic light")
    assert one("north of a sign post") == Hint("north", None, "traffic sign")
    assert one("north of a light pole") == Hint("north", None, "lamp")
    assert one("north of a junction box") == Hint("north", None, "box")


# --- ego-relative words --------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["a tree is to my left", "the building is in front of me", "a pole is behind me",
                                  "a wall is on the right", "there's a lamp ahead"])
def test_ego_words_without_heading_are_refused(text):
    parsed = parse_instruction(text)
    assert parsed.hints == ()
    assert len(parsed.refused) == 1 and "heading" in parsed.refused[0]


@pytest.mark.parametrize("text, yaw_deg, direction", [
    # facing east (yaw 0): left is north -> the object lies north -> the pose is south of it
    ("a tree is to my left", 0, "south"),
    ("a tree is to my right", 0, "north"),
    ("a tree is in front of me", 0, "west"),
    ("a tree is behind me", 0, "east"),
    # facing north (yaw 90 deg): left is west
    ("a tree is to my left", 90, "east"),
    ("a tree is ahead", 90, "south"),
    ("there's a tree on my right hand side", 90, "west"),
    # facing south-west-ish (yaw 200 deg): ahead lies at 200 deg -> snapped west; the pose is east
    ("a tree is straight ahead", 200, "east"),
    ("a tree is at my back", -160, "west"),
])
def test_ego_words_with_heading(text, yaw_deg, direction):
    assert one(text, heading_yaw=math.radians(yaw_deg)) == Hint(direction, None, "vegetation")


def test_pose_relative_ego_words_are_refused_as_ambiguous():
    parsed = parse_instruction("I am in front of the building", heading_yaw=0.0)
    assert parsed.hints == () and "depends on how" in parsed.refused[0]


def test_facing_states_a_heading_not_a_hint():
    parsed = parse_instruction("I'm facing north, a tree is on my left")
    assert parsed.hints == () and parsed.unread == () and len(parsed.refused) == 1


@pytest.mark.parametrize("yaw", [float("nan"), float("inf"), "north", True])
def test_bad_heading_is_rejected(yaw):
    with pytest.raises(ValueError):
        parse_instruction("a tree is to my left", heading_yaw=yaw)


def test_text_must_be_a_string():
    with pytest.raises(TypeError):
        parse_instruction(None)


# --- nothing to read -----------------------------------------------------------------------------------
def test_nonsense_gives_no_hint():
    parsed = parse_instruction("colorless green ideas sleep furiously")
    assert parsed.hints == ()
    assert parsed.unread == ("colorless green ideas sleep furiously",)
    assert "colour" in parsed.unread_reasons[0]


def test_direction_alone_is_unread_with_reason():
    parsed = parse_instruction("north")
    assert parsed.hints == () and parsed.unread == ("north",) and parsed.unread_reasons == ("no object named",)


@pytest.mark.parametrize("text, reason", [
    ("a tree is north of a building", "relative to the building"),
    ("north of the tree is a building", "relative to the vegetation"),
    ("a car is north of a building", "'car'"),
    ("The pose is north of a gray car", "'car' is not one of the 21 classes"),
    ("I am next to a building", "no direction given for the building"),
    ("a tree to my east just north of me", "cannot tell"),
])
def test_unreadable_clauses_say_why(text, reason):
    parsed = parse_instruction(text)
    assert parsed.hints == ()
    assert parsed.unread and reason in " ".join(parsed.unread_reasons), parsed.describe()


def test_filler_only_clauses_are_ignored():
    parsed = parse_instruction("Hi! I am north of a gray building, ok?")
    assert parsed.hints == (Hint("north", "gray", "building"),) and parsed.unread == ()


def test_unread_keeps_the_fragment_as_written():
    parsed = parse_instruction("I am north of a Gray Building. Hello Wörld zebra crossing!")
    assert parsed.unread == ("Hello Wörld zebra crossing",)


# --- describe and check_hints --------------------------------------------------------------------------
def test_describe_is_one_line_naming_hints_refusals_and_unread():
    parsed = parse_instruction("I am north of a gray building. a tree is to my left. blah")
    line = parsed.describe()
    assert "\n" not in line
    assert "north of a gray building" in line and "refused" in line and "'blah'" in line


def test_check_hints():
    parsed = parse_instruction("I am north of a gray building. a tree is to my left. north")
    assert check_hints(parsed, 1) is None
    reason = check_hints(parsed, 3)
    assert reason is not None
    assert "understood 1 hint (north of a gray building)" in reason
    assert "at least 3" in reason and "heading" in reason and "'north'" in reason
    assert check_hints(parse_instruction(""), 1).startswith("understood 0 hints")
    with pytest.raises(ValueError):
        check_hints(parsed, -1)


def test_parsed_instruction_is_frozen_and_consistent():
    parsed = parse_instruction("north of a pole")
    with pytest.raises(AttributeError):
        parsed.hints = ()
    with pytest.raises(ValueError):
        ParsedInstruction((), ("x",), ())


# --- lists of objects ----------------------------------------------------------------------------------
def test_list_after_a_pose_relative_clause_shares_its_direction():
    assert hints_of("I'm west of a pole, a sign, a beige post and a grey box.") == (
        Hint("west", None, "pole"), Hint("west", None, "traffic sign"), Hint("west", "beige", "smallpole"),
        Hint("west", "gray", "box"))


def test_list_before_a_plural_clause_shares_its_direction():
    assert hints_of("A black pole and a grey road sign are both west of me") == (
        Hint("east", "black", "pole"), Hint("east", "gray", "traffic sign"))
    assert hints_of("South of me are a grey wall, the sidewalk and the road") == (
        Hint("north", "gray", "wall"), Hint("north", None, "sidewalk"), Hint("north", None, "road"))


@pytest.mark.parametrize("text", ["There is a lamp to my east, a tree", "To my east is a lamp. A tree.",
                                  "a tree. a sign is west of me", "I'm on the road, near a tree"])
def test_no_list_across_sentences_or_without_a_shared_direction(text):
    parsed = parse_instruction(text)
    assert len(parsed.hints) == 1 and all(h.label != "vegetation" for h in parsed.hints), parsed.describe()
    assert any("vegetation" in r for r in parsed.unread_reasons)


@pytest.mark.parametrize("text", ["I'm in the middle of the road", "I am in a parking lot", "inside a grey building"])
def test_in_is_on_top(text):
    assert one(text).direction == "on-top"


@pytest.mark.parametrize("text, expected", [
    ("a light gray box is also east of me", [("west", "bright-gray", "box")]),
    ("a dark green bin and a street lamp are also to my east",
     [("west", "dark-green", "trash bin"), ("west", None, "lamp")]),
    ("I am north of a gray building also south of a green pole",
     [("north", "gray", "building"), ("south", "green", "pole")]),
])
def test_also_after_a_verb_is_an_adverb_not_a_clause_boundary(text, expected):
    assert [(h.direction, h.colour, h.label) for h in parse_instruction(text).hints] == expected


@pytest.mark.parametrize("text", ["The pose is south of my gray pole.", "I am south of my gray pole.",
                                  "The robot is south of our gray pole."])
def test_a_possessive_before_the_object_keeps_the_direction(text):
    assert [(h.direction, h.colour, h.label) for h in parse_instruction(text).hints] == [("south", "gray", "pole")]
