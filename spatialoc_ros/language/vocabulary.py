"""Word tables of the instruction parser: what a user may say for each class, colour and direction.

Every phrase is written *normalised*, the way :func:`normalise_words` turns text into words:
lower case, "grey" spelled "gray", hyphens and dashes as spaces ("north-east" -> "north east",
"on-top" -> "on top", "dark-green" -> "dark green"). Nouns are singular; a plural is matched by
singularising the phrase's last word ("trash bins" -> "trash bin", "bushes" -> "bush").

Classes (:data:`CLASS_SYNONYMS`) follow the KITTI-360 label definitions (Cityscapes style):
``vegetation`` is trees, bushes and hedges; ``terrain`` is grass, soil and sand, so "grass" and
"lawn" are terrain. Deliberately absent: "ground" (anything under one's feet; "on the ground" would
become an on-top terrain hint), "barrier" (a wall, a fence or a guard rail), bare "light" (it is also a
colour word: "light gray"). "post" and "bollard" are ``smallpole``; "lamp post" and "sign post"
are matched first because longer phrases always win.

Colours (:data:`COLOUR_SYNONYMS`): the data set names an object by the colour centre nearest to its
mean rgb, and its seven names are really a brightness scale of grayish tones: black (28) <
dark-green (47) < green (66) < gray-green (88) < gray (110, 136) < beige (170) < bright-gray (214).
So (1) the seven names and their spellings map to themselves ("dark green", "grey green", "greyish
green", "light grey" = "bright gray", "light green" = the lighter green); (2) any other word in
:data:`COLOUR_REFERENCE_RGB` maps to the centre nearest (L2) to that word's usual rgb, with the data
set's own rule (:func:`spatialoc_ros.data.constants.color_name`). That gives white / silver / ivory /
cream / light / bright / pale -> bright-gray, tan / khaki / sandy -> beige, slate -> gray, dark gray
/ olive -> gray-green, charcoal -> dark-green, dark -> black. Hues the centres do not span (red,
blue, yellow, brown, ...) are not listed: such an object keeps its class and no colour, which costs the
model less than a wrong colour.
"""
from __future__ import annotations

import re

import numpy as np

from spatialoc_ros.data.constants import CLASSES, PAD_LABEL, UNIQUE_COLOR_NAMES, color_name

#: The 21 real classes (padding excluded).
REAL_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c != PAD_LABEL)

#: class -> phrases a user may say for it (normalised, singular). The class name itself is implied.
_CLASS_PHRASES: dict[str, tuple[str, ...]] = {
    "building": ("house", "home", "shop", "store", "office", "office building", "apartment",
                 "apartment building", "apartment block", "block of flats", "tower block", "skyscraper",
                 "church", "school", "hotel", "warehouse", "factory", "residential building"),
    "pole": ("utility pole", "power pole", "telegraph pole", "telephone pole", "electricity pole", "mast"),
    "traffic light": ("traffic signal", "stoplight", "stop light", "signal light"),
    "traffic sign": ("sign", "road sign", "street sign", "signpost", "sign post", "signboard"),
    "garage": ("carport",),
    "stop": ("bus stop", "tram stop", "stop sign", "bus shelter"),
    "smallpole": ("small pole", "post", "bollard"),
    "lamp": ("street light", "streetlight", "street lamp", "streetlamp", "lamppost", "lamp post",
             "lamp pole", "light pole", "lantern"),
    "trash bin": ("trash can", "trashcan", "garbage can", "garbage bin", "litter bin", "rubbish bin",
                  "waste bin", "dustbin", "bin"),
    "vending machine": ("vending", "vendor machine"),
    "box": ("utility box", "electrical box", "electric box", "junction box", "control box", "cabinet"),
    "road": ("street", "lane", "roadway", "carriageway", "avenue", "highway", "asphalt", "intersection",
             "crossroad"),
    "sidewalk": ("side walk", "pavement", "footpath", "foot path", "walkway", "footway", "pedestrian path",
                 "path"),
    "parking": ("parking lot", "car park", "parking space", "parking spot", "parking area", "parking lane",
                "parking place", "parking bay"),
    "wall": (),
    "fence": ("fencing",),
    "guard rail": ("guardrail", "railing", "crash barrier"),
    "bridge": ("overpass", "flyover"),
    "tunnel": ("underpass",),
    "vegetation": ("tree", "bush", "shrub", "shrubbery", "hedge", "hedgerow", "plant", "foliage", "greenery"),
    "terrain": ("grass", "lawn", "meadow", "soil", "dirt", "gravel", "field", "verge", "grass verge",
                "grassland", "sand"),
}

#: Colour phrases naming one of the data set's seven colour names directly.
_COLOUR_NAME_PHRASES: dict[str, tuple[str, ...]] = {
    "dark-green": ("dark green", "darkgreen", "deep green"),
    "gray": ("grayish",),
    "gray-green": ("gray green", "grayish green", "greenish gray", "grayishgreen"),
    "bright-gray": ("bright gray", "light gray", "lightgray", "brightgray", "pale gray"),
    "black": (),
    "green": ("light green",),
    "beige": (),
}

#: Other colour words and the rgb (0..255) they usually mean; each maps to the nearest data-set centre.
COLOUR_REFERENCE_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "off white": (250, 249, 246),
    "ivory": (255, 255, 240),
    "cream": (255, 253, 208),
    "silver": (192, 192, 192),
    "light": (220, 220, 220),
    "bright": (225, 225, 225),
    "pale": (215, 215, 210),
    "tan": (210, 180, 140),
    "khaki": (195, 176, 145),
    "sandy": (194, 178, 128),
    "slate": (112, 128, 144),
    "dark gray": (90, 90, 90),
    "olive": (128, 128, 0),
    "charcoal": (54, 54, 54),
    "dark": (30, 30, 30),
}


def _build_colours() -> dict[str, str]:
    table: dict[str, str] = {}
    for name in UNIQUE_COLOR_NAMES:
        table[normalise_phrase(name)] = name
        for phrase in _COLOUR_NAME_PHRASES[name]:
            table[normalise_phrase(phrase)] = name
    for phrase, rgb in COLOUR_REFERENCE_RGB.items():
        table.setdefault(normalise_phrase(phrase), color_name(np.asarray(rgb, dtype=np.float64) / 255.0))
    return table


def _build_classes() -> dict[str, str]:
    table: dict[str, str] = {}
    for label in REAL_CLASSES:
        table[normalise_phrase(label)] = label
        for phrase in _CLASS_PHRASES[label]:
            key = normalise_phrase(phrase)
            if key in table and table[key] != label:
                raise ValueError(f"class phrase {phrase!r} given for both {table[key]!r} and {label!r}")
            table[key] = label
    return table


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:\.\d+)?")


def normalise_words(text: str) -> list[str]:
    """Lower-case words of ``text``: 'grey' -> 'gray', hyphens / dashes / slashes separate words."""
    text = text.lower().replace("\u2019", "'").replace("grey", "gray")
    text = re.sub(r"[-\u2010-\u2015/_]", " ", text)
    return _WORD.findall(text)


def normalise_phrase(phrase: str) -> str:
    return " ".join(normalise_words(phrase))


def singular(word: str) -> str:
    """English plural -> singular for the nouns of the tables ('bushes' -> 'bush', 'trees' -> 'tree')."""
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us")):
        return word[:-1]
    return word


#: normalised phrase -> class name (one of the 21 real classes).
CLASS_SYNONYMS: dict[str, str] = _build_classes()
#: normalised phrase -> colour name (one of UNIQUE_COLOR_NAMES).
COLOUR_SYNONYMS: dict[str, str] = _build_colours()

#: The data set's four compass directions; "on-top" is the fifth direction word.
CARDINALS: tuple[str, ...] = ("north", "south", "east", "west")
ON_TOP = "on-top"
INVERSE_DIRECTION: dict[str, str] = {"north": "south", "south": "north", "east": "west", "west": "east",
                                     ON_TOP: ON_TOP}
#: Compass angle of each direction, radians, ROS convention (0 = +x = east, counter-clockwise).
DIRECTION_ANGLE: dict[str, float] = {"east": 0.0, "north": 0.5 * np.pi, "west": np.pi, "south": 1.5 * np.pi}

#: Words for the four compass directions.
CARDINAL_WORDS: dict[str, str] = {}
for _d in CARDINALS:
    for _form in (_d, _d + "ern", _d + "ward", _d + "wards", _d + "erly"):
        CARDINAL_WORDS[_form] = _d
#: Phrases between two compass directions (refused: the data set has no diagonal directions).
COMPOUND_PHRASES: frozenset[str] = frozenset(
    f"{a}{sep}{b}{suffix}"
    for a in ("north", "south") for b in ("east", "west")
    for sep in ("", " ") for suffix in ("", "ern", "ward", "wards", "erly")
) | frozenset(f"{a} {a} {b}" for a in ("north", "south") for b in ("east", "west")) | frozenset(
    f"{b} {a} {b}" for a in ("north", "south") for b in ("east", "west"))

#: Ego-relative direction words -> angle of the object from the robot's heading (radians, CCW).
EGO_OFFSETS: dict[str, float] = {"front": 0.0, "left": 0.5 * np.pi, "back": np.pi, "right": -0.5 * np.pi}

#: Hues the data set's centres do not span: read as plain adjectives, the object gets no colour.
UNMAPPED_COLOUR_WORDS: frozenset[str] = frozenset((
    "red", "reddish", "blue", "bluish", "yellow", "yellowish", "orange", "purple", "pink", "violet", "brown",
    "brownish", "gold", "golden", "turquoise", "teal", "cyan", "magenta", "maroon", "navy", "colourful",
    "colorful",
))

#: Words that name the robot / the position being described (first, second and third person).
SELF_WORDS: frozenset[str] = frozenset((
    "i", "i'm", "im", "i've", "i'd", "i'll", "me", "myself", "we", "we're", "we've", "we'd", "us",
    "ourselves", "you", "you're", "you've", "yourself", "robot", "pose", "position", "location",
))
#: Possessives whose next word may be a direction ("to my left", "to the robot's south").
POSSESSIVE_WORDS: frozenset[str] = frozenset(("my", "our", "your", "robot's"))
#: Words that say which way the robot faces; the compass word after them is not a hint.
HEADING_WORDS: frozenset[str] = frozenset(("facing", "face", "faces", "heading", "headed", "looking", "pointing",
                                           "oriented", "orientated", "driving", "walking", "moving", "going"))

#: Articles and quantifiers.
ARTICLE_WORDS: frozenset[str] = frozenset((
    "a", "an", "the", "some", "one", "two", "three", "four", "few", "several", "many", "any", "more", "another",
    "other", "same", "both", "all", "each", "either",
))
#: Shape, size and material adjectives (no colour).
SHAPE_WORDS: frozenset[str] = frozenset((
    "tall", "big", "large", "small", "huge", "tiny", "high", "low", "short", "long", "wide", "narrow", "old",
    "new", "modern", "wooden", "metal", "metallic", "concrete", "stone", "brick", "painted", "colored",
    "coloured", "single", "lone", "main", "whole", "little",
))
#: Words that carry no meaning for a hint: articles, verbs of being and standing, hedges, distances,
#: shape adjectives, discourse words. Anything not in a table and not here is an unknown word.
FILLER_WORDS: frozenset[str] = ARTICLE_WORDS | SHAPE_WORDS | frozenset((
    # pronouns
    "this", "that", "these", "those", "it", "it's", "its", "there", "there's", "here", "here's", "that's",
    "which", "who", "they", "they're", "them",
    # being, standing, seeing
    "is", "am", "are", "was", "were", "be", "been", "being", "'s", "lies", "lie", "lying", "stands", "stand",
    "standing", "stood", "sits", "sit", "sitting", "located", "situated", "positioned", "placed", "parked",
    "stopped", "waiting", "wait", "see", "sees", "seeing", "can", "could", "should", "would", "will", "have",
    "has", "having", "got", "find", "found", "spot", "notice", "think", "guess", "believe", "say", "seems",
    "seem", "appears", "appear", "do", "does", "there're", "currently", "presently", "now",
    # prepositions that do not carry a direction here
    "to", "at", "from", "by", "with", "near", "nearby", "next", "beside", "close", "towards", "toward",
    "away", "around", "along", "off", "as",
    # hedges and distances
    "just", "slightly", "directly", "exactly", "roughly", "about", "approximately", "nearly", "almost",
    "maybe", "perhaps", "probably", "likely", "possibly", "somewhat", "quite", "very", "bit", "couple", "less",
    "or", "kind", "sort", "due", "straight", "far", "immediately", "immediate", "mostly", "meter", "meters",
    "metre", "metres", "m", "feet", "ft", "foot", "yard", "yards", "step", "steps", "km", "cm", "ish", "only",
    "really", "actually", "basically", "somewhere", "well", "so", "ok", "okay", "hi", "hello", "hey", "hmm",
    "um", "uh", "please", "oh", "too", "side", "sides", "hand",
))
