"""Free-text position descriptions -> the data set's hint sentences, without any learned model.

The model was trained only on sentences ``The pose is {direction} of a {colour} {label}.``; this
module reads what a person would rather say and rewrites it into those sentences, or says why it
cannot. It is pure Python (no ROS, no torch).

Reading, in order:

1. **Clauses.** The text is cut at ``. , ; ! ?``, line breaks and the words *and, then, also, but,
   plus* (none of them occurs inside a class or colour phrase). A period between two digits
   ("5.5 m") does not cut. Each clause is read on its own and gives zero, one or more hints.
2. **Words.** Lower case, "grey" -> "gray", hyphens as spaces, plurals singularised; phrases of the
   tables in :mod:`spatialoc_ros.language.vocabulary` are matched longest first, so "traffic light",
   "lamp post", "stop sign" win over "light", "post", "sign". Articles, hedges ("just", "right",
   "a bit", "about 5 m"), verbs of being / standing / seeing and shape adjectives are dropped;
   other words are *unknown*.
3. **Cues.** A direction word binds to what follows it:

   * ``DIR of OBJECT`` is *pose-relative*: the pose is DIR of the object ("I am north of a gray
     building", "just east of the green pole", "the robot is south of a tree"). Its subject must be
     the speaker or absent: with another object as subject ("a tree is north of a building") it
     relates two objects and is not read.
   * ``DIR of me`` / ``my DIR`` / bare ``DIR`` is *object-relative*: the object named elsewhere in the
     clause lies DIR of the pose, so the hint takes the inverse direction ("there is a gray building
     to my south", "a gray pole is east of me", "to the south of me is X", "X lies to the north",
     "X is north").
   * ``on / on top of / upon / over / above / under / below / beneath / in / inside OBJECT`` (the
     pose's x-y lies in the object's footprint) and ``OBJECT is under / below / over me`` give
     ``on-top``.
   * Lists: bare objects separated by ',' / 'and' share the direction of the clause before them when
     it ends with its object ("I am west of a pole, a sign and a box"), or of the clause after them
     when that one is plural ("a black pole and a gray sign are both west of me"). A list of
     directions ("lamps to my south, west and east") is not distributed.
4. **Directions the data set lacks.** Diagonals ("north-east", "northwest") are refused with a
   reason: the data set only has the dominant axis and the parser cannot tell which one dominates.
   Ego-relative words (left, right, in front of, ahead, behind) need the robot's heading: without
   ``heading_yaw`` the clause is refused; with it (radians, ROS: 0 = facing +x = east,
   counter-clockwise, north = +y) the object's bearing is heading + (0 front, +90 deg left, 180 deg
   behind, -90 deg right), the pose lies at the opposite bearing, snapped to the nearest compass
   direction (a tie at exactly 45 deg goes counter-clockwise). Ego words are read only in the
   object-relative form ("the tree is to my left"); "I am left of / in front of the building"
   depends on how the building is looked at, and is refused. A compass word after "facing",
   "heading", "looking", ... states the heading and is not a hint.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from spatialoc_ros.data.constants import DIRECTIONS, UNIQUE_COLOR_NAMES
from spatialoc_ros.language.vocabulary import (
    ARTICLE_WORDS,
    CARDINAL_WORDS,
    CLASS_SYNONYMS,
    COLOUR_SYNONYMS,
    COMPOUND_PHRASES,
    EGO_OFFSETS,
    FILLER_WORDS,
    HEADING_WORDS,
    INVERSE_DIRECTION,
    ON_TOP,
    POSSESSIVE_WORDS,
    REAL_CLASSES,
    SELF_WORDS,
    SHAPE_WORDS,
    UNMAPPED_COLOUR_WORDS,
    normalise_words,
    singular,
)

#: Words that cut a text into clauses (besides . , ; ! ? and line breaks).
CLAUSE_WORDS: tuple[str, ...] = ("and", "then", "also", "but", "plus")
_CLAUSE_SPLIT = re.compile(
    r"((?<!\d)\.|\.(?!\d)|[,;!?\n\r]|\b(?:" + "|".join(CLAUSE_WORDS) + r")\b)", re.IGNORECASE
)
#: 'also' right after a verb is an adverb inside the clause, not a clause boundary.
_ADVERB_ALSO = re.compile(r"\b(is|are|was|were|'s|’s|stands?|lies?|sits?|stays?)\s+also\b", re.IGNORECASE)
#: Separators across which a list of objects shares one direction ("a pole, a sign and a box are west of me").
_LIST_SEPARATORS = frozenset((",", "and"))
#: Words a bare list item may hold besides its object ("a tall gray building").
_LIST_WORDS = ARTICLE_WORDS | SHAPE_WORDS
#: Words that make a clause's single direction apply to the bare objects listed before it.
_PLURAL_WORDS = frozenset(("are", "were", "both", "all"))
#: Compass order for snapping an angle (ROS: 0 = east, counter-clockwise).
_COMPASS: tuple[str, ...] = ("east", "north", "west", "south")

# Kinds of the items a clause is read into.
_OBJ, _COLOUR, _CARD, _EGO, _COMPOUND, _ONTOP, _ONTOP_BARE, _OF, _SELF, _POSS, _UNK = (
    "object", "colour", "cardinal", "ego", "compound", "on-top", "on-top-bare", "of", "self", "poss", "unknown"
)
#: Structural phrases (normalised) -> the items they stand for.
_STRUCTURE: dict[str, tuple[tuple[str, str], ...]] = {
    "on top of": ((_ONTOP, ""),), "on top": ((_ONTOP, ""),), "ontop": ((_ONTOP, ""),), "atop": ((_ONTOP, ""),),
    "on": ((_ONTOP, ""),), "upon": ((_ONTOP, ""),), "over": ((_ONTOP, ""),), "above": ((_ONTOP, ""),),
    "under": ((_ONTOP, ""),), "underneath": ((_ONTOP, ""),), "below": ((_ONTOP, ""),),
    "beneath": ((_ONTOP, ""),), "in": ((_ONTOP, ""),), "inside": ((_ONTOP, ""),), "within": ((_ONTOP, ""),),
    "in the middle of": ((_ONTOP, ""),), "overhead": ((_ONTOP_BARE, ""),), "underfoot": ((_ONTOP_BARE, ""),),
    "in front of": ((_EGO, "front"), (_OF, "")), "in front": ((_EGO, "front"),),
    "ahead of": ((_EGO, "front"), (_OF, "")), "ahead": ((_EGO, "front"),), "forward": ((_EGO, "front"),),
    "forwards": ((_EGO, "front"),), "in back of": ((_EGO, "back"), (_OF, "")), "behind": ((_EGO, "back"),),
    "left": ((_EGO, "left"),), "of": ((_OF, ""),),
}
#: Ego words that are directions only after a possessive / article ("my right", "the back").
_EGO_AFTER_DETERMINER: dict[str, str] = {"right": "right", "front": "front", "back": "back", "rear": "back"}
_DETERMINERS = frozenset(("my", "our", "your", "robot's", "the", "to", "on"))
_HEADING_SKIP = frozenset(("to", "towards", "toward", "the", "due", "straight"))
_MAX_PHRASE = 4


@dataclass(frozen=True)
class Hint:
    """One hint in the data set's vocabulary: the pose is ``direction`` of a ``colour`` ``label``.

    ``direction`` is one of north / south / east / west / on-top; ``colour`` one of the data set's
    colour names or None when the text gave none; ``label`` one of the 21 classes.
    """

    direction: str
    colour: Optional[str]
    label: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.colour is not None and self.colour not in UNIQUE_COLOR_NAMES:
            raise ValueError(f"colour must be None or one of {UNIQUE_COLOR_NAMES}, got {self.colour!r}")
        if self.label not in REAL_CLASSES:
            raise ValueError(f"label must be one of the 21 classes, got {self.label!r}")

    def phrase(self) -> str:
        """'north of a gray building' (the hint without 'The pose is')."""
        noun = f"{self.colour} {self.label}" if self.colour else self.label
        return f"{self.direction} of a {noun}"


@dataclass(frozen=True)
class ParsedInstruction:
    """What :func:`parse_instruction` read from one text.

    ``hints``: the hints, in the order of the text. ``unread``: the clauses (as written) that gave no
    hint or only part of one, with ``unread_reasons[i]`` saying why for ``unread[i]``. ``refused``:
    ``"'clause': reason"`` for clauses that were understood but cannot be expressed in the data
    set's vocabulary (ego-relative words without a heading, diagonal directions). ``heading_yaw``:
    the heading used for ego-relative words (radians), or None.
    """

    hints: tuple[Hint, ...]
    unread: tuple[str, ...] = ()
    unread_reasons: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    heading_yaw: Optional[float] = None

    def __post_init__(self) -> None:
        if len(self.unread) != len(self.unread_reasons):
            raise ValueError(f"{len(self.unread)} unread fragments but {len(self.unread_reasons)} reasons")

    def describe(self) -> str:
        """One line: the hints read, then what was refused and what was not read."""
        parts = []
        if self.hints:
            parts.append(f"{len(self.hints)} hint{'s' if len(self.hints) != 1 else ''}: "
                         + "; ".join(h.phrase() for h in self.hints))
        else:
            parts.append("no hint read")
        if self.heading_yaw is not None:
            parts.append(f"heading {math.degrees(self.heading_yaw):.0f} deg")
        if self.refused:
            parts.append("refused: " + "; ".join(self.refused))
        if self.unread:
            parts.append("not read: " + "; ".join(f"'{f}' ({r})" for f, r in zip(self.unread, self.unread_reasons)))
        return " | ".join(parts)


@dataclass(frozen=True)
class _Item:
    kind: str
    value: str  # class, colour, direction, ego key, or the word
    start: int  # index of the first word
    colour: Optional[str] = None  # objects only


@dataclass(frozen=True)
class _Cue:
    relative_to: str  # "pose" (DIR of OBJECT) or "object" (OBJECT lies DIR of the pose)
    item: int  # index of the direction item in the clause's items
    obj: Optional[int] = None  # item index of the object of a pose-relative cue


@dataclass(frozen=True)
class _Relation:
    """What a cue says, apart from its object: a direction item read pose- or object-relative."""

    kind: str  # _CARD, _EGO, _COMPOUND, _ONTOP or _ONTOP_BARE
    value: str
    relative_to: str
    said: str  # the words as written, for reasons


@dataclass
class _ClauseResult:
    hints: list[tuple[int, Hint]]  # (word position, hint)
    refusals: list[str]
    problems: list[str]
    list_object: Optional[_Item] = None  # the clause is a bare list item: "a tall gray building"
    tail: Optional[_Relation] = None  # the clause ends with the object of this relation ("... west of a pole")
    plural_head: Optional[_Relation] = None  # "... are west of me": the single relation of a plural clause


# --- words -> items --------------------------------------------------------------------------------
def _lookup(words: Sequence[str], i: int, length: int) -> Optional[list[tuple[str, str]]]:
    phrase = " ".join(words[i:i + length])
    if phrase in COMPOUND_PHRASES:
        return [(_COMPOUND, phrase)]
    label = CLASS_SYNONYMS.get(phrase)
    if label is None:
        plural = " ".join([*words[i:i + length - 1], singular(words[i + length - 1])])
        label = CLASS_SYNONYMS.get(plural)
    if label is not None:
        return [(_OBJ, label)]
    if phrase in COLOUR_SYNONYMS:
        return [(_COLOUR, COLOUR_SYNONYMS[phrase])]
    if phrase in _STRUCTURE:
        return list(_STRUCTURE[phrase])
    return None


def _single_word(words: Sequence[str], i: int) -> Optional[tuple[str, str]]:
    """Item of a word no phrase matched; None for filler words."""
    w = words[i]
    if w in CARDINAL_WORDS:
        return _CARD, CARDINAL_WORDS[w]
    if w in POSSESSIVE_WORDS:
        return _POSS, w
    if w in SELF_WORDS:
        return _SELF, w
    if w in _EGO_AFTER_DETERMINER:
        prev = words[i - 1] if i > 0 else ""
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if prev in _DETERMINERS or (w == "right" and (nxt in ("of", "hand", "side") or not nxt)):
            return _EGO, _EGO_AFTER_DETERMINER[w]
        return None  # "right next to", "right to my east": a hedge
    if w in FILLER_WORDS or w in UNMAPPED_COLOUR_WORDS or w.replace(".", "", 1).isdigit():
        return None
    return _UNK, w


def _items(words: Sequence[str]) -> tuple[list[_Item], set[int]]:
    """The items of a clause's words, and the indices of the words that are part of an item."""
    items: list[_Item] = []
    covered: set[int] = set()
    i = 0
    while i < len(words):
        if words[i] in HEADING_WORDS:  # "facing north": a heading, not a hint
            j = i + 1
            while j < len(words) and words[j] in _HEADING_SKIP:
                j += 1
            i += 1
            for length in range(3, 0, -1):
                phrase = " ".join(words[j:j + length])
                if j + length <= len(words) and (phrase in COMPOUND_PHRASES or phrase in CARDINAL_WORDS):
                    i = j + length
                    break
            continue
        for length in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
            found = _lookup(words, i, length)
            if found is not None:
                items.extend(_Item(kind, value, i) for kind, value in found)
                covered.update(range(i, i + length))
                i += length
                break
        else:
            single = _single_word(words, i)
            if single is not None:
                items.append(_Item(single[0], single[1], i))
                covered.add(i)
            i += 1
    return _attach_colours(items), covered


def _attach_colours(items: list[_Item]) -> list[_Item]:
    """A colour right before an object (fillers between are gone) becomes the object's colour."""
    out: list[_Item] = []
    for it in items:
        if it.kind == _OBJ and out and out[-1].kind == _COLOUR:
            colour = out.pop()
            it = _Item(_OBJ, it.value, colour.start, colour.value)
        out.append(it)
    return out


# --- items -> hints --------------------------------------------------------------------------------
def _find_cues(items: list[_Item]) -> tuple[list[_Cue], set[int], list[str]]:
    """Cues of a clause, the indices of possessives a cue used, and words named after 'DIR of' that
    are no class ("north of a red car")."""
    cues: list[_Cue] = []
    unknown_objects: list[str] = []
    used_poss: set[int] = set()
    n = len(items)
    for k, it in enumerate(items):
        nxt = items[k + 1] if k + 1 < n else None
        if it.kind in (_CARD, _EGO, _COMPOUND):
            if k > 0 and items[k - 1].kind == _POSS:
                cues.append(_Cue("object", k))
                used_poss.add(k - 1)
            elif nxt is not None and nxt.kind == _OF:
                after = items[k + 2] if k + 2 < n else None
                if after is not None and after.kind == _POSS and k + 3 < n and items[k + 3].kind == _OBJ:
                    # "south of my gray pole": the possessive belongs to the object, the pose is south of it
                    cues.append(_Cue("pose", k, k + 3))
                    used_poss.add(k + 2)
                elif after is not None and after.kind == _OBJ:
                    cues.append(_Cue("pose", k, k + 2))
                elif after is not None and after.kind in (_UNK, _COLOUR):
                    # "north of the (gray) car": about something the classes do not have
                    words_after = [x.value for x in items[k + 2:k + 4] if x.kind == _UNK]
                    unknown_objects.append(f"'{words_after[0]}' is not one of the 21 classes" if words_after
                                           else f"a colour ({after.value}) but no object I know")
                else:
                    cues.append(_Cue("object", k))
            else:
                cues.append(_Cue("object", k))
        elif it.kind == _ONTOP and nxt is not None:
            if nxt.kind == _OBJ:
                cues.append(_Cue("pose", k, k + 1))
            elif nxt.kind == _SELF:
                cues.append(_Cue("object", k))
        elif it.kind == _ONTOP_BARE:
            cues.append(_Cue("object", k))
    return cues, used_poss, unknown_objects


def _subject_of(items: list[_Item], k: int, pose_objects: dict[int, int], used_poss: set[int]) -> Optional[int]:
    """The subject of the pose-relative cue at item ``k``: None when it is the pose (the speaker, or no
    subject at all), else the index of the object or unknown word the cue is about.

    Walks back to the clause start; the object of an earlier pose-relative cue is skipped together
    with that cue (its subject was already judged: "I'm on the sidewalk north of a building").
    """
    unknown_at: Optional[int] = None
    j = k - 1
    while j >= 0:
        kind = items[j].kind
        if j in pose_objects or kind == _SELF:
            return None
        if kind == _OBJ:
            return j
        if unknown_at is None and (kind == _UNK or (kind == _POSS and j not in used_poss)):
            unknown_at = j
        j -= 1
    return unknown_at


def _direction_words(words: Sequence[str], items: list[_Item], k: int) -> str:
    """The words of the direction item ``k`` ("north east", "left")."""
    end = items[k + 1].start if k + 1 < len(items) else len(words)
    if end > items[k].start:
        return " ".join(words[items[k].start:end])
    return {"front": "in front", "back": "in back"}.get(items[k].value, items[k].value)


def _snap(angle: float) -> str:
    quarter = math.floor(angle / (0.5 * math.pi) + 0.5)
    return _COMPASS[quarter % 4]


def _resolve(rel: _Relation, obj: _Item, heading_yaw: Optional[float]) -> Hint | str:
    """The hint a relation gives for an object, or the reason it cannot be given."""
    if rel.kind == _COMPOUND:
        return (f"'{rel.said}' lies between two directions and the data set only knows north, south, east, "
                "west and on-top; say which of the two is stronger")
    if rel.kind == _EGO:
        if rel.relative_to == "pose":
            return (f"'{rel.said} of the {obj.value}' depends on how the {obj.value} is looked at; say where "
                    f"the {obj.value} is from you ('the {obj.value} is to my left') or use north / south / east / west")
        if heading_yaw is None:
            return (f"'{rel.said}' is relative to the robot's heading, which was not given; give heading_yaw or "
                    "use north / south / east / west")
        bearing = heading_yaw + EGO_OFFSETS[rel.value]  # where the object lies
        direction = _snap(bearing + math.pi)  # the pose lies the opposite way from the object
    elif rel.kind in (_ONTOP, _ONTOP_BARE):
        direction = ON_TOP
    elif rel.relative_to == "pose":
        direction = rel.value
    else:
        direction = INVERSE_DIRECTION[rel.value]
    return Hint(direction, obj.colour, obj.value)


def _read_clause(words: Sequence[str]) -> Optional[tuple[_ClauseResult, list[tuple[_Relation, _Item]]]]:
    """Problems and (relation, object) pairs of one clause; None when it holds nothing to read (only
    fillers, or only 'I am')."""
    items, covered = _items(words)
    if not any(it.kind not in (_SELF, _POSS, _OF) for it in items):
        return None
    if len(items) == 1 and items[0].kind == _OBJ and all(
            w in _LIST_WORDS for i, w in enumerate(words) if i not in covered):
        return _ClauseResult([], [], [f"no direction given for the {items[0].value}"], list_object=items[0]), []
    cues, used_poss, unknown_objects = _find_cues(items)
    unknown = [it.value for it in items if it.kind == _UNK]
    has_self = any(it.kind == _SELF or (it.kind == _POSS and it.value == "robot's") for it in items)
    res = _ClauseResult([], [], list(unknown_objects))

    # pose-relative cues: check their subject
    pose_cues: list[_Cue] = []
    pose_objects: dict[int, int] = {}
    modifiers: set[int] = set()
    subjects: set[int] = set()
    for cue in (c for c in cues if c.relative_to == "pose"):
        subject = _subject_of(items, cue.item, pose_objects, used_poss)
        if subject is None:
            pose_cues.append(cue)
            pose_objects[cue.obj] = cue.item
        else:
            modifiers.add(cue.obj)
            subjects.add(subject)
            what = items[subject].value if items[subject].kind == _OBJ else f"'{items[subject].value}'"
            res.problems.append(f"it says where the {what} is relative to the {items[cue.obj].value}, "
                                "not where the pose is")
    candidates = [i for i, it in enumerate(items) if it.kind == _OBJ and i not in pose_objects and i not in modifiers]
    object_cues = [c for c in cues if c.relative_to == "object"]

    if candidates and not object_cues and pose_cues and not has_self:
        # "north of the tree is a building": the building, not the pose, is north of the tree
        res.problems.append(f"it says where the {items[candidates[0]].value} is relative to the "
                            f"{items[pose_cues[0].obj].value}, not where the pose is")
        subjects.update(candidates)
        pose_cues = []
    pairs: list[tuple[_Cue, int]] = [(c, c.obj) for c in pose_cues]
    if object_cues and len(object_cues) == len(candidates):
        pairs.extend(zip(object_cues, candidates))
    elif object_cues and not candidates:
        res.problems.append("no object named"
                            + (f" ('{unknown[0]}' is not one of the 21 classes)" if unknown else ""))
    elif object_cues:
        res.problems.append(f"{len(object_cues)} directions for {len(candidates)} objects: "
                            "cannot tell which goes with which")
    elif any(i not in subjects for i in candidates):
        lonely = next(i for i in candidates if i not in subjects)
        res.problems.append(f"no direction given for the {items[lonely].value}")
    if not cues and not candidates and not unknown_objects:
        colours = [it.value for it in items if it.kind == _COLOUR]
        if colours:
            res.problems.append(f"a colour ({colours[0]}) but no object I know")
        elif unknown:
            res.problems.append(f"no object or direction I know ('{unknown[0]}')")
        else:
            res.problems.append("no object named")

    relations = []
    for cue, obj_index in sorted(pairs, key=lambda p: items[p[1]].start):
        d = items[cue.item]
        rel = _Relation(d.kind, d.value, cue.relative_to, _direction_words(words, items, cue.item))
        relations.append((rel, items[obj_index]))
        if obj_index == len(items) - 1:
            res.tail = rel
    if len(pairs) == 1 and _PLURAL_WORDS.intersection(words):
        res.plural_head = relations[0][0]
    return res, relations


def split_clauses(text: str) -> list[str]:
    """The clauses of ``text`` as written (stripped, empty ones dropped); see the module docstring."""
    return [c for c, _ in _clauses_with_separators(text)]


def _clauses_with_separators(text: str) -> list[tuple[str, bool]]:
    """(clause, whether only ',' / 'and' separate it from the clause before) for the non-empty clauses."""
    text = _ADVERB_ALSO.sub(r"\1", text)  # "a box is also east of me": 'also' after a verb cuts nothing
    parts = _CLAUSE_SPLIT.split(text)  # text, separator, text, separator, ...
    out: list[tuple[str, bool]] = []
    separators: set[str] = set()
    for k, part in enumerate(parts):
        if k % 2:
            separators.add(part.lower())
        elif part.strip():
            out.append((part.strip(), bool(out) and bool(separators) and separators <= _LIST_SEPARATORS))
            separators = set()
    return out


class _Reading:
    """Collects hints, refusals and unread clauses in text order."""

    def __init__(self, heading_yaw: Optional[float]) -> None:
        self.heading_yaw = heading_yaw
        self.hints: list[Hint] = []
        self.unread: list[str] = []
        self.reasons: list[str] = []
        self.refused: list[str] = []

    def add(self, clause: str, relations: Iterable[tuple[_Relation, _Item]], problems: Sequence[str] = ()) -> None:
        refusals, n_hints = [], 0
        for rel, obj in relations:
            out = _resolve(rel, obj, self.heading_yaw)
            if isinstance(out, Hint):
                self.hints.append(out)
                n_hints += 1
            else:
                refusals.append(out)
        if refusals:
            self.refused.append(f"'{clause}': " + "; ".join(dict.fromkeys(refusals)))
        if problems and (n_hints or not refusals):
            reason = "; ".join(dict.fromkeys(problems))
            self.unread.append(clause)
            self.reasons.append(f"partly read: {reason}" if n_hints else reason)


def parse_instruction(text: str, heading_yaw: Optional[float] = None) -> ParsedInstruction:
    """Read a free-text description of a position into data-set hints (see the module docstring).

    Args:
        text: e.g. "I'm on the sidewalk, a gray building is east of me and a pole just north".
        heading_yaw: the robot's heading in radians (ROS: 0 = +x = east, counter-clockwise), needed
            for left / right / ahead / behind; None refuses those words.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if heading_yaw is not None:
        if isinstance(heading_yaw, bool) or not isinstance(heading_yaw, (int, float)) or not math.isfinite(heading_yaw):
            raise ValueError(f"heading_yaw must be a finite number of radians or None, got {heading_yaw!r}")
        heading_yaw = float(heading_yaw)
    reading = _Reading(heading_yaw)
    pending: list[tuple[str, _ClauseResult]] = []  # bare list items waiting for a plural clause
    tail: Optional[_Relation] = None
    for clause, in_list in _clauses_with_separators(text):
        read = _read_clause(normalise_words(clause))
        if read is None:
            continue
        res, relations = read
        if res.list_object is not None:
            if tail is not None and in_list:  # "I am west of a pole, a sign and a box"
                reading.add(clause, [(tail, res.list_object)])
            else:
                if not in_list:
                    for held_clause, held in pending:
                        reading.add(held_clause, [], held.problems)
                    pending = []
                pending.append((clause, res))
                tail = None
            continue
        if pending and res.plural_head is not None and in_list:  # "a pole and a sign are west of me"
            for held_clause, held in pending:
                reading.add(held_clause, [(res.plural_head, held.list_object)])
        else:
            for held_clause, held in pending:
                reading.add(held_clause, [], held.problems)
        pending = []
        reading.add(clause, relations, res.problems)
        tail = res.tail
    for held_clause, held in pending:
        reading.add(held_clause, [], held.problems)
    return ParsedInstruction(tuple(reading.hints), tuple(reading.unread), tuple(reading.reasons),
                             tuple(reading.refused), heading_yaw)


def render_hint(hint: Hint) -> str:
    """The sentence the model was trained on: 'The pose is north of a gray building.'"""
    return f"The pose is {hint.phrase()}."


def render_hints(hints: Iterable[Hint]) -> list[str]:
    return [render_hint(h) for h in hints]


def all_hint_sentences() -> list[str]:
    """Every sentence :func:`render_hint` can write: 5 directions x (7 colours or none) x 21 classes
    = 840. Every instruction is read into these, so a language model sees nothing else."""
    return [render_hint(Hint(d, c, label)) for d in DIRECTIONS for c in (None, *UNIQUE_COLOR_NAMES)
            for label in REAL_CLASSES]


def check_hints(parsed: ParsedInstruction, min_hints: int) -> Optional[str]:
    """None when ``parsed`` holds at least ``min_hints`` hints, else the reason, naming what was read and
    what was refused or not understood."""
    if isinstance(min_hints, bool) or not isinstance(min_hints, int) or min_hints < 0:
        raise ValueError(f"min_hints must be a non-negative integer, got {min_hints!r}")
    n = len(parsed.hints)
    if n >= min_hints:
        return None
    read = f"understood {n} hint{'s' if n != 1 else ''}" + (
        " (" + "; ".join(h.phrase() for h in parsed.hints) + ")" if n else "")
    parts = [f"{read} but at least {min_hints} {'are' if min_hints != 1 else 'is'} needed"]
    if parsed.refused:
        parts.append("refused: " + "; ".join(parsed.refused))
    if parsed.unread:
        parts.append("not understood: " + "; ".join(
            f"'{f}' ({r})" for f, r in zip(parsed.unread, parsed.unread_reasons)))
    parts.append("describe more objects around the position, e.g. 'a gray building is east of me'")
    return "; ".join(parts)
