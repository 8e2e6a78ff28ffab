"""The one exception type for user mistakes (bad specs, bad inputs, bad paths), and the exit
codes every command and trainer ends with.

A trainer rank that meets a user mistake records it in status.json (`mark_failed(...,
user_error=True)`) and exits 0 under torchrun (a non-zero exit would bury the message in
torchrun's failure report), 2 without it; the launcher reads the record (launcher/attempt.py)
and exits 2 with the same one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix: names the file, the dotted field and what was expected.

    The CLI prints it in one or two lines and exits with code 2; everything else
    stays a traceback because it is a bug of ours.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.field = field
        self.expected = expected
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        text = f"{where}: {self.message}" if where else self.message
        if self.expected:
            text += f" (expected {self.expected})"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UserErrors(UserError):
    """Several user mistakes found in one pass, so a spec is fixed in one go."""

    def __init__(self, errors: list[UserError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


EXIT_USER_ERROR = 2  # a mistake the user can fix; said in one line, nothing half-written
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def run_command(body: Callable[[], int | None]) -> int:
    """Run one command's body (a CLI verb, a tool): a user mistake prints `hpctrain: error: ...`
    and gives exit code 2, Ctrl-C gives 130; anything else stays a traceback (a bug of ours)."""
    try:
        return body() or 0
    except UserError as e:
        print(f"hpctrain: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hpctrain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hpctrain status RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
