"""A per-phone name with placeholders: the Redis hash key or the folder of one phone's keys.

`{organizationId}`, `{organizationPhoneId}` and `{phone}` (the bare number) are the placeholders; a template
names one phone only if it holds `{organizationPhoneId}` or `{phone}` (a close deletes everything under the
name: a name shared by several phones would delete the neighbours' keys too)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import PurePosixPath

from sidecar.config_values import ConfigError
from sidecar.rules.records import PhoneRef

PLACEHOLDERS = ("organizationId", "organizationPhoneId", "phone")
PER_PHONE = frozenset({"organizationPhoneId", "phone"})
# What a rendered value may hold: ids are integers; a bare number is digits (a LID user too).
_PHONE = re.compile(r"^[0-9]{1,32}\Z")


class UnknownPhone(Exception):
    """The template needs the phone's number and the sidecar does not know it."""


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    text: str
    fields: frozenset[str]

    @classmethod
    def parse(cls, key: str, text: str) -> KeyTemplate:
        if not text:
            raise ConfigError(key, "the template is empty")
        if any(ord(character) < 32 or ord(character) == 127 for character in text):
            raise ConfigError(key, "the template holds a control character")
        names: set[str] = set()
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as error:
            problem = f"malformed template {text!r}: {error} (write a literal brace as {{{{ or }}}})"
            raise ConfigError(key, problem) from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                known = ", ".join("{" + placeholder + "}" for placeholder in PLACEHOLDERS)
                raise ConfigError(key, f"unknown placeholder {{{name}}} in {text!r}; known: {known}")
            names.add(name)
        if not names & PER_PHONE:
            raise ConfigError(
                key,
                f"{text!r} names no single phone: it needs {{organizationPhoneId}} or {{phone}} (a close "
                "deletes everything under the name)",
            )
        return cls(text, frozenset(names))

    def render(self, phone: PhoneRef) -> str:
        number = phone.phone_user
        if "phone" in self.fields and (number is None or not _PHONE.match(number)):
            raise UnknownPhone(f"the phone number of organizationPhoneId {phone.organization_phone_id} is not known")
        return self.text.format(
            organizationId=phone.organization_id, organizationPhoneId=phone.organization_phone_id, phone=number
        )

    def fixed_folder(self) -> str:
        """A path template's folder before its first placeholder (`/a/b/` of `/a/b/{x}` and `/a/b/p{x}`)."""
        fixed = self.fixed_prefix()
        return fixed if fixed.endswith("/") else str(PurePosixPath(fixed).parent)

    def fixed_prefix(self) -> str:
        """The text before the first placeholder."""
        literal = []
        for text, name, _, _ in string.Formatter().parse(self.text):
            literal.append(text)
            if name is not None:
                break
        return "".join(literal)
