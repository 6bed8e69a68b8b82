"""Transparent huge pages for PyTorch's CPU allocations during training.

A full-size training step writes hundreds of MB of fresh per-point rows (a PointNet++ ball member
list of a batch is 0.3-2 M rows). Each big CPU tensor is a fresh memory mapping, and with the
kernel's 4 KiB pages its first write costs one page fault per page: here 187 ms for a
446 MB tensor against 31 ms to overwrite one already mapped. PyTorch's CPU allocator asks the
kernel for 2 MiB pages for its large blocks when the environment variable ``THP_MEM_ALLOC_ENABLE``
is ``1`` (44 ms for the same tensor). It reads that variable once, at the process's first large CPU
allocation, so :func:`enable_huge_pages` must run before any big tensor exists. Nothing computed
changes, only how the memory is mapped.

The kernel must allow it: ``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise`` or
``always``. A value the user already gave (e.g. ``THP_MEM_ALLOC_ENABLE=0`` to turn it off) is kept.
"""
from __future__ import annotations

import os
from typing import Optional

#: The environment variable PyTorch's CPU allocator reads.
THP_ENV = "THP_MEM_ALLOC_ENABLE"
#: The kernel's transparent-huge-page mode (the word in brackets: always, madvise or never).
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
#: Kernel modes in which PyTorch's request for huge pages takes effect.
THP_MODES_ALLOWING = ("always", "madvise")


def kernel_thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
    """The selected word of the kernel's THP mode file ("always [madvise] never" -> "madvise"),
    None when the file is absent or unreadable (not Linux, no THP)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def enable_huge_pages(mode_file: str = THP_MODE_FILE) -> str:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for this process (and its children) unless the user set it or
    the kernel does not allow huge pages. -> one line saying what holds, for the run's log."""
    given = os.environ.get(THP_ENV)
    if given is not None:
        return f"huge pages: {THP_ENV}={given} as given"
    mode = kernel_thp_mode(mode_file)
    if mode not in THP_MODES_ALLOWING:
        return f"huge pages: not used (kernel transparent_hugepage mode {mode or 'unknown'})"
    os.environ[THP_ENV] = "1"
    return f"huge pages: on for large CPU tensors (kernel mode {mode}; {THP_ENV}=0 turns them off)"
