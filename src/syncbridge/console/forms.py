"""Form bodies, read without a multipart library: the console's forms are all urlencoded and small."""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.requests import Request

__all__ = ["MAX_FORM_BYTES", "Form", "FormTooLarge", "read_form"]

#: a console form is a few fields; anything larger is not one of ours
MAX_FORM_BYTES = 16 * 1024


class FormTooLarge(Exception):
    """The body is larger than any console form."""


class Form:
    """Field name -> values, as submitted."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._fields.get(name)
        return values[0] if values else default

    def text(self, name: str, limit: int = 500) -> str | None:
        """A free-text field, trimmed; None when empty."""
        value = (self.get(name) or "").strip()
        return value[:limit] or None

    def all(self, name: str) -> list[str]:
        return list(self._fields.get(name, []))

    def flag(self, name: str) -> bool:
        return self.get(name) in ("1", "on", "true", "yes")


async def read_form(request: Request) -> Form:
    """The urlencoded body of ``request``; raises FormTooLarge past MAX_FORM_BYTES."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise FormTooLarge()
        chunks.append(chunk)
    body = b"".join(chunks).decode("utf-8", errors="replace")
    return Form(parse_qs(body, keep_blank_values=True, max_num_fields=200))
