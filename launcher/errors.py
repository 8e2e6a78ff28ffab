"""The one exception type for user mistakes (bad specs, bad inputs, bad paths)."""

from __future__ import annotations


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
