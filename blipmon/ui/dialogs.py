"""Small modal screens: a yes/no question, a choice between a few keyed answers, and the key list.

Questions name runs and folders (``Delete the run exp[v2]…?``), so every text here is built as
``rich.text.Text``, never parsed as markup, with control characters made visible.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from blipmon.core.safe_text import one_line, printable


def _keyed(key: str, label: str) -> Text:
    """``key  label`` with the key in bold: plain text, whatever the label holds."""
    return Text.assemble((one_line(key), "bold"), "  ", one_line(label))


class ChoiceScreen(ModalScreen[str | None]):
    """A question answered with one key; Escape cancels (None)."""

    def __init__(self, question: str, choices: Sequence[tuple[str, str, str]]) -> None:
        """``choices`` are (key, label, value) triples, e.g. ("s", "stop the run", "stop")."""
        super().__init__()
        self.question = question
        self.choices = list(choices)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(printable(self.question)), classes="dialog-question")
            for key, label, _ in self.choices:
                yield Static(_keyed(key, label), classes="dialog-choice")
            yield Static(_keyed("esc", "cancel"), classes="dialog-choice")

    def on_key(self, event: object) -> None:
        key = getattr(event, "key", "")
        for k, _, value in self.choices:
            if key == k:
                getattr(event, "stop", lambda: None)()
                self.dismiss(value)
                return
        if key == "escape":
            getattr(event, "stop", lambda: None)()
            self.dismiss(None)


class ConfirmScreen(ChoiceScreen):
    """Yes or no; anything but ``y`` is no."""

    def __init__(self, question: str) -> None:
        super().__init__(question, [("y", "yes", "yes"), ("n", "no", "no")])


class StopOrLeaveScreen(ChoiceScreen):
    """Leaving a view whose child still runs: it is the user's work, so never stop it without asking.

    Answers "stop", "leave" or None (stay).
    """

    def __init__(self, what: str, stopped_note: str, attach_hint: str) -> None:
        super().__init__(
            f"The {what} is still going. Stop it, or leave it running?",
            [
                ("s", f"stop the {what}, then leave ({stopped_note})", "stop"),
                ("l", f"leave it running ({attach_hint})", "leave"),
            ],
        )


class HelpScreen(ModalScreen[None]):
    """Every key of the screen underneath, with what it does."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "close")]

    def __init__(self, title: str, keys: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.keys = list(keys)

    def compose(self) -> ComposeResult:
        width = max((len(k) for k, _ in self.keys), default=4)
        text = Text.assemble((one_line(self.title_text), "bold"), " — keys\n")
        for k, d in self.keys:
            text.append("\n  ")
            text.append_text(_keyed(f"{k:<{width}}", d))
        text.append("\n\n  ")
        text.append_text(_keyed("ctrl+s", "save this view as SVG"))
        text.append("\n\nesc, q or ? closes this help", "dim")
        with Vertical(classes="dialog help"):
            yield Static(text)

    def action_close(self) -> None:
        self.dismiss(None)


def binding_keys(
    bindings: Sequence[Binding | tuple[str, ...]], visible: set[str] | None = None
) -> list[tuple[str, str]]:
    """(key, description) for the help screen, from a screen's BINDINGS, with readable key names."""
    names = {
        "question_mark": "?",
        "space": "space",
        "left": "←",
        "right": "→",
        "shift+left": "shift+←",
        "shift+right": "shift+→",
        "plus": "+",
        "minus": "-",
        "equals_sign": "=",
        "escape": "esc",
        "enter": "enter",
        **{"comma": ",", "full_stop": ".", "up": "↑", "down": "↓"},  # the run view's module view (issue 12)
    }
    out = []
    for b in bindings:
        if not isinstance(b, Binding):
            continue
        if visible is not None and b.action not in visible:
            continue
        key = "/".join(names.get(k.strip(), k.strip()) for k in b.key.split(","))
        out.append((key, b.description or b.action))
    return out
