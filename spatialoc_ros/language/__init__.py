"""Free-text position descriptions -> the data set's hint sentences (ROS-free, no learned model)."""
from spatialoc_ros.language.parser import (
    Hint,
    ParsedInstruction,
    all_hint_sentences,
    check_hints,
    parse_instruction,
    render_hint,
    render_hints,
    split_clauses,
)

__all__ = [
    "Hint",
    "ParsedInstruction",
    "all_hint_sentences",
    "check_hints",
    "parse_instruction",
    "render_hint",
    "render_hints",
    "split_clauses",
]
