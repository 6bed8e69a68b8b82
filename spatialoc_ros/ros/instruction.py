"""Checks on an instruction text before it is read (ROS-free, pure).

A text is refused, with a reason meant for one log line, when it is empty, whitespace only or
longer than a limit; control characters become spaces and whitespace runs one space. What the
text says is read afterwards by :mod:`spatialoc_ros.language` (the localizer refuses a text that
holds fewer than ``min_hints`` hints, naming what it understood). Non-ASCII text is allowed.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class InstructionCheck:
    """``text`` is the cleaned instruction when ``ok``; otherwise ``reason`` says why not."""

    ok: bool
    text: str = ""
    reason: str = ""


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
    return InstructionCheck(True, text=text)
