"""Text from untrusted places (child output, profiles, file and run names, configs) made safe to show.

Everything blipmon displays was written by someone else: a training script's exception, a file name, a
run folder, a sweep.json edited by hand. Two things must never happen to such text: Textual reading it as
markup (``[/INST]`` raises ``MarkupError`` and takes the dashboard down) and a control character reaching
the terminal (``ESC ]0;…`` retitles it, ``ESC [2J`` clears it). This module is the one place that decides
how such text is made visible, for the dashboard and the command line alike.
"""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, and the C1 range (U+0080..U+009F: 8-bit CSI/OSC introducers).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Whole ANSI escape sequences (CSI ... final byte; OSC ... BEL or ST), so ``ESC[31m`` vanishes as one
# unit instead of leaving ``[31m`` behind.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
# Anything the two above could touch. Text without any (almost all text) is returned as it is, so the
# dashboard can pass every cell it draws through here at the cost of one failed regex search.
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _visible(match: re.Match[str]) -> str:
    ch = match.group(0)
    code = ord(ch)
    if code == 0x0D:  # a bare carriage return (progress bars) would overwrite the line
        return ""
    if code < 0x20:
        return "^" + chr(code + 0x40)  # caret notation, as `cat -v` shows it
    return f"\\x{code:02x}"


def printable(text: object, *, keep_newlines: bool = True) -> str:
    """``text`` with escape sequences removed and every other control character made visible.

    Tabs become spaces (a terminal would move the cursor). Invalid UTF-8 has already become U+FFFD
    wherever blipmon decodes with ``errors="replace"``; lone surrogates from ``surrogateescape`` are
    replaced here too, so the result always encodes as UTF-8.
    """
    s = text if isinstance(text, str) else str(text)
    if _ANY_CONTROL.search(s) is None:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (``surrogateescape``, or ``\\udc80`` in JSON)
            return s.encode("utf-8", "replace").decode("utf-8")
        return s
    s = _ANSI.sub("", s)
    s = s.replace("\t", "    ")
    if not keep_newlines:
        s = s.replace("\r\n", " ").replace("\n", " ")
    s = _CONTROL.sub(_visible, s)
    return s.encode("utf-8", "replace").decode("utf-8")


def one_line(text: object) -> str:
    """``printable`` on one line: for names, statuses and table cells."""
    return printable(text, keep_newlines=False)


# Each C0 control as its Unicode picture (U+2400..U+241F, ␛ for ESC), DEL as ␡, the C1 range as U+FFFD.
_PICTURES = {c: 0x2400 + c for c in range(0x20)} | {0x7F: 0x2421} | {c: 0xFFFD for c in range(0x80, 0xA0)}


def control_pictures(text: str) -> str:
    """``text`` with each control character replaced by one visible character, and nothing else changed.

    For text being edited (an input field): one character for one keeps every position in the
    text where it was, so a cursor or a selection computed on the value still lands right, which
    the caret notation of ``printable`` (two characters for one) would break.
    """
    if _ANY_CONTROL.search(text) is None:
        return text
    return text.translate(_PICTURES)
