"""User-facing errors: one clear line, a non-zero exit, never a traceback.

Library code raises ``EffdstlError`` (or a subclass) for anything the user can fix; the CLI
catches it and prints ``error: <message>``. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class EffdstlError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 2

    def __str__(self) -> str:
        text = super().__str__()
        if "\nOriginal Traceback" in text:  # re-raised by a DataLoader worker: its own one line
            last = text.strip().splitlines()[-1]
            head, sep, rest = last.partition(": ")
            return rest if sep and head.rsplit(".", 1)[-1] == type(self).__name__ else last
        return text


def unknown(kind: str, name: str, choices: Iterable[str]) -> EffdstlError:
    """``unknown model 'resnet81' (did you mean 'resnet18'?; choices: ...)``."""
    choices = sorted(set(choices))
    near = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return EffdstlError(f"unknown {kind} '{name}'{hint}; choices: {shown}")
