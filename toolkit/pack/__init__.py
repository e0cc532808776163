"""`toolkit pack`: turn an image folder or a CSV list into split, validated WebDataset shards.

The stages, each in its own module:

    scan     list the source: (path, label, explicit split) per candidate image, plus what was
             ignored or rejected before any file is read
    split    find identical bytes, assign each image to train/val/test, order each split
    shards   write deterministic tar shards and the resume state of finished shards
    run      orchestration: the two worker passes (hash, then normalize) and the output files
    report   the summary of a run and its rendering as a table
"""

from __future__ import annotations


class PackError(Exception):
    """A source, option or output folder that stops `toolkit pack`; the message names it and the fix."""


# PackError is defined before these imports because the submodules import it from here.
from toolkit.pack.report import PackSummary, SplitSummary, render_summary  # noqa: E402
from toolkit.pack.run import run_pack  # noqa: E402

__all__ = ["PackError", "PackSummary", "SplitSummary", "render_summary", "run_pack"]
