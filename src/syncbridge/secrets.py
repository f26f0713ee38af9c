"""Secrets by reference: an environment variable, a file, or a systemd credential.

A secret is never written in the YAML itself; the config holds ``{env: NAME}``,
``{file: /path}`` or ``{credential: NAME}`` (read from ``$CREDENTIALS_DIRECTORY``, which
systemd's ``LoadCredential=`` fills).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import AuthError

__all__ = ["SecretRef", "SECRET_HELP"]

SECRET_HELP = (
    "secrets are given by reference, never inline: {env: VAR_NAME}, {file: /path/to/file} "
    "or {credential: NAME} (systemd LoadCredential)"
)


class SecretRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None
    credential: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline(cls, value: Any) -> Any:
        if isinstance(value, str | int | float):
            raise ValueError(SECRET_HELP)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        given = [k for k in ("env", "file", "credential") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file or credential")
        return self

    def describe(self) -> str:
        if self.env:
            return f"environment variable {self.env}"
        if self.file:
            return f"file {self.file}"
        return f"systemd credential {self.credential}"

    def reveal(self) -> str:
        """The secret's value; raises AuthError naming where it was looked for (never the value)."""
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise AuthError(f"secret {self.describe()} is not set", action=f"export {self.env}=...")
            return value
        if self.file:
            path = self.file
        else:
            base = os.environ.get("CREDENTIALS_DIRECTORY")
            if not base:
                raise AuthError(
                    f"secret {self.describe()} needs $CREDENTIALS_DIRECTORY",
                    action="add LoadCredential= to the unit or use {file: ...}",
                )
            path = Path(base) / str(self.credential)
        try:
            return path.read_text().strip()
        except OSError as err:
            raise AuthError(f"secret {self.describe()} cannot be read ({err.strerror})") from err
