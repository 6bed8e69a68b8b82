"""Checks on an instruction text before it reaches the model (ROS-free, pure).

The localizer answers texts in the vocabulary it was trained on: hints such as
"The pose is north of a gray building." A text is refused, with a reason meant for one log line,
when it is empty, whitespace only, longer than a limit, or names neither an object class, a colour
nor a direction of that vocabulary (nonsense, or another language). Other non-ASCII characters are
allowed (they are simply passed to the text encoder).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Optional

from spatialoc_ros.data.constants import CLASSES, DIRECTIONS, PAD_LABEL, UNIQUE_COLOR_NAMES

#: An example of a well-formed instruction, quoted in refusal messages.
EXAMPLE_INSTRUCTION = "The pose is north of a gray building. The pose is east of a dark-green vegetation."

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_VOCABULARY: frozenset[str] = frozenset(
    word
    for phrase in (
        *(c for c in CLASSES if c != PAD_LABEL),
        *UNIQUE_COLOR_NAMES,
        *DIRECTIONS,
    )
    for word in (phrase, *phrase.replace("-", " ").split())
) - frozenset({"on"})  # "on" alone (from "on-top") is too common a word to count


@dataclass(frozen=True)
class InstructionCheck:
    """``text`` is the cleaned instruction when ``ok``; otherwise ``reason`` says why not."""

    ok: bool
    text: str = ""
    reason: str = ""


def _preview(text: str, limit: int = 40) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def check_instruction(raw: Optional[str], max_chars: int) -> InstructionCheck:
    """Validate and normalise one instruction.

    Normalisation: Unicode NFKC, control characters to spaces, runs of whitespace to one space,
    stripped. The length limit applies to the raw text (a 1 MB message is refused without
    further work).
    """
    if raw is None:
        return InstructionCheck(False, reason="empty instruction")
    if len(raw) > max_chars:
        return InstructionCheck(
            False,
            reason=f"instruction too long ({len(raw)} characters > max_instruction_chars={max_chars})",
        )
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = " ".join(text.split())
    if not text:
        what = "empty instruction" if not raw else f"whitespace-only instruction ({len(raw)} characters)"
        return InstructionCheck(False, reason=what)
    words = set(_WORD.findall(text.lower()))
    if not words & _VOCABULARY:
        return InstructionCheck(
            False,
            reason=(
                f"instruction {_preview(text)} names no known object class, colour or direction "
                f"(expected hints like {EXAMPLE_INSTRUCTION!r})"
            ),
        )
    return InstructionCheck(True, text=text)
