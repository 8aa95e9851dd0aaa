"""The LVOS videos whose objects belong to classes absent from LVOS's training split.

LVOS reports these "unseen" videos apart from the others. The names are data published with the
benchmark's official evaluation tool (``unseen_videos.txt`` of ``LingyiHongfd/lvos-evaluation``);
:func:`s3cli.eval.lvos_scoring.score_lvos` takes another list when given one.
"""

from __future__ import annotations

__all__ = ["LVOS_UNSEEN_VIDEOS"]

LVOS_UNSEEN_VIDEOS: frozenset[str] = frozenset(
    """
    R3UJGYwy K3OUeINk 058oeZ2p xpI7xRWN FiRTBMg2 nfcT3owb JGG6MrhF yfzVCnvU 6mNj04tC yWnanBID
    v3uNUctx 49TNsJzk gw84JOqH 711gAS21 dtHbJvYy tAyQIobn vJ8W2TO5 FmzvB44A 8lxxCA5h N6CONZUW
    Oj1z5fO0 gdqCcvs2 LWVlKBlK yxCvN6OJ pMntJwSQ p9RjdKoh 9NA8c5C3 m37l7ti1 nwflTTf1 LY2zehlH
    beR0WT11 afoR2rH6 xQZlxhxV o36i3YWC cdzAjcuN IlvtT6D6 YfoFnMgm FiQUhyRi 9oLyy7aJ 9RoNInYO
    wrrX6bxv q2HE4zaM rvwT3piq ZFqAoImI bwcKqVSN QE1wMR58 eEcUJVBZ Qf9YVXOW SRRojucs PQfn7XV2
    3bvEjhOT
    """.split()
)
