"""The last lines of ``child.log``, read incrementally and made safe to show.

A module of its own: every source (live, attached, replayed) shows the child's log the same way.
"""

from __future__ import annotations

import codecs
import os
from collections import deque
from pathlib import Path

from blipmon.core.safe_text import one_line
from blipmon.core.units import fmt_bytes

LOG_LINES = 400
LOG_TAIL_BYTES = 1 << 20  # the most of child.log read at once; beyond it the start is skipped (and said)


class LogTail:
    """The last lines of a growing text file, read incrementally; carriage returns end lines too,
    so a progress bar redrawn with ``\\r`` shows as its latest state rather than one huge line.

    Only the newest ``budget`` bytes are ever read at once: when more than that is waiting (a
    replay of a run that logged 30,000 warnings before its traceback, or an attach to a long run),
    the start is skipped and ``snapshot()`` begins with a line saying how much, so what ended the
    run is what the view shows. Every line comes out through ``safe_text.one_line``: escape
    sequences a child printed never reach the terminal, other control characters are made visible.
    """

    def __init__(self, path: Path, keep: int = LOG_LINES, budget: int = LOG_TAIL_BYTES) -> None:
        self.path = path
        self.lines: deque[str] = deque(maxlen=keep)
        self.budget = max(int(budget), 1)
        self.skipped = 0  # bytes at the start of the file left out to reach its tail (none shown)
        self._offset = 0
        self._partial = ""
        self._decoder = _utf8_decoder()
        self.version = 0

    def poll(self) -> bool:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self._offset:  # rewritten from the start: read it afresh
                    self._restart(0, 0)
                if size - self._offset > self.budget:
                    start = size - self.budget
                    fh.seek(start)
                    data = fh.read(self.budget)
                    # The line the cut falls in is partly skipped: drop it whole (unless it is all there is).
                    cut = data.find(b"\n")
                    drop = cut + 1 if 0 <= cut < len(data) - 1 else 0
                    self._restart(start + len(data), start + drop)  # lines read before are cleared too
                    data = data[drop:]
                else:
                    fh.seek(self._offset)
                    data = fh.read(self.budget)
                    self._offset += len(data)
        except OSError:
            return False
        if not data:
            return False
        text = self._partial + self._decoder.decode(data)
        parts = text.replace("\r\n", "\n").split("\n")
        self._partial = parts.pop()
        for part in parts:
            segs = [s for s in part.split("\r") if s.strip()]
            self.lines.append(one_line(segs[-1]) if segs else "")
        self.version += 1
        return True

    def _restart(self, offset: int, skipped: int) -> None:
        self.lines.clear()
        self._partial = ""
        self._decoder = _utf8_decoder()
        self._offset = offset
        self.skipped = skipped

    def skipped_line(self) -> str | None:
        """What the view says in place of the skipped start, or None when nothing was skipped."""
        if not self.skipped:
            return None
        return (
            f"[blipmon: {self.path.name} is long: its first {fmt_bytes(self.skipped)} ({self.skipped:,} bytes) "
            f"are skipped here; the whole log is {one_line(self.path)}]"
        )

    def snapshot(self) -> tuple[str, ...]:
        head = self.skipped_line()
        tail = (one_line(self._partial.split("\r")[-1]),) if self._partial.strip() else ()
        return ((head,) if head else ()) + tuple(self.lines) + tail


def _utf8_decoder() -> codecs.IncrementalDecoder:
    """UTF-8 across reads: a character split between two reads is decoded whole; invalid bytes become U+FFFD."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
