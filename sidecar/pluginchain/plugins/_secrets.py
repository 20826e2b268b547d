"""Secrets: the files that hold them, and the names under which requests carry them.

**Credential names** (:func:`is_credential_name`, :func:`without_credential_parameters`): which
headers and query parameters a plugin never hands to a third party unless told to. A name is a
credential's when, lower-cased and cut at ``-``, ``_`` and ``.``, one of its parts is in
:data:`CREDENTIAL_NAME_PARTS`: ``authorization``, ``proxy-authorization``, ``cookie``,
``set-cookie``, ``api-key``, ``x-api-key``, ``x-goog-api-key``, ``ocp-apim-subscription-key``,
``x-amz-security-token``, ``x-auth-token``; ``key``, ``api_key``, ``apikey``, ``token``,
``access_token``, ``sig``, ``signature``, ``X-Amz-Signature``, ``X-Amz-Credential``,
``client_secret``. Whole parts, so ``max_tokens`` or ``x-ratelimit-remaining-tokens`` are not.

**Secret files** come from a mounted Secret, read on first use and re-read whenever they change.

Kubernetes rotates a mounted Secret by swapping a symlink to a new file, and an operator may
replace a file by hand; so the file's identity (device, inode, size, modification and change
times) is checked with one ``stat`` on every use, and the file is read and parsed again only when
that identity changed. The same approach as the sidecar's push-token file, for plugins (which may
not import the sidecar layer).

A problem (the file is missing, unreadable, or does not parse) is logged once per change of
problem, naming the file and the problem, never the contents; and once more when the file is
usable again. What a problem means is the owner's choice:

- a file that is missing or cannot be read never serves: :meth:`SecretFile.get` returns ``None``
  (fail closed: a deleted secret is revoked, not remembered);
- a file that is read but does not parse serves ``None`` too, unless ``keep_last_good`` is set:
  then what the file held before stays in use (a half-written or mistyped rotation does not
  lock everyone out), and ``None`` only when it never parsed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import unquote_plus

T = TypeVar("T")

CREDENTIAL_NAME_PARTS = frozenset({
    "auth", "authorization", "authentication", "cookie", "key", "apikey", "token", "jwt",
    "secret", "password", "passwd", "credential", "credentials", "signature", "sig",
})
"""Parts of a header or query parameter name that make it a credential's (see the module doc)."""

_NAME_SEPARATORS = re.compile(r"[-_.]")


def is_credential_name(name: str) -> bool:
    """Whether a header or query parameter named ``name`` may carry a credential (any case)."""
    return not CREDENTIAL_NAME_PARTS.isdisjoint(_NAME_SEPARATORS.split(name.lower()))


def without_credential_parameters(value: str, keep: Collection[str] = ()) -> str:
    """``value`` (a path or URL, as ``:path`` or ``referer`` carry one) without the query
    parameters whose names are credentials' (:func:`is_credential_name`) unless ``keep`` (lower
    case) names them. The rest is left byte for byte, in order; anything without a query as is."""
    base, question, rest = value.partition("?")
    if not question:
        return value
    query, hash_sign, fragment = rest.partition("#")
    kept = []
    for parameter in query.split("&"):
        name = unquote_plus(parameter.partition("=")[0]).lower()
        if name in keep or not is_credential_name(name):
            kept.append(parameter)
    return base + ("?" + "&".join(kept) if kept else "") + hash_sign + fragment


class SecretFileProblem(ValueError):
    """Raised by a parser: the file cannot be used. The message names the problem (a line
    number, a field), never a value from the file: it is logged."""


class SecretFile(Generic[T]):
    """One secret file, parsed by ``parse`` into a ``T``; :meth:`get` costs one ``stat`` while the
    file is unchanged.

    ``what`` names the file in log lines (``"API keys file"``), ``refusal`` says what follows
    when nothing usable is left (``"every API key is refused"``). ``parse`` gets the raw bytes and
    raises :class:`SecretFileProblem` (or ``ValueError``) with a message that holds no secret.
    """

    __slots__ = ("path", "_parse", "_what", "_refusal", "_keep_last_good", "_logger", "_identity", "_value", "_problem")

    def __init__(
        self,
        path: str | os.PathLike[str],
        parse: Callable[[bytes], T],
        *,
        what: str,
        refusal: str,
        keep_last_good: bool = False,
        logger: logging.Logger,
    ):
        self.path = Path(path)
        self._parse = parse
        self._what = what
        self._refusal = refusal
        self._keep_last_good = keep_last_good
        self._logger = logger
        self._identity: tuple[int, ...] | None = None
        self._value: T | None = None
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """What is wrong with the file as last read, or None when it was usable."""
        return self._problem

    def get(self) -> T | None:
        """The parsed contents, re-read if the file changed; None when there is nothing usable."""
        try:
            stat = os.stat(self.path)
        except OSError as error:
            self._unusable(f"cannot be read: {error.strerror or type(error).__name__}")
            return None
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if identity == self._identity:
            return self._value
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            self._unusable(f"cannot be read: {error.strerror or type(error).__name__}")
            return None
        try:
            value = self._parse(raw)
        except ValueError as error:
            # Not parsed again until the file changes: a broken file costs one stat per use.
            self._identity = identity
            problem = str(error) or "cannot be parsed"
            if self._keep_last_good and self._value is not None:
                self._report(problem, "keeping what it held before")
            else:
                self._value = None
                self._report(problem, self._refusal)
            return self._value
        self._identity = identity
        self._value = value
        if self._problem is not None:
            self._logger.info("%s %s is usable again", self._what, self.path)
        self._problem = None
        return value

    def _unusable(self, problem: str) -> None:
        self._identity = None
        self._value = None
        self._report(problem, self._refusal)

    def _report(self, problem: str, consequence: str) -> None:
        # Once per change of problem, not once per request.
        if problem != self._problem:
            self._logger.error("%s %s %s; %s", self._what, self.path, problem, consequence)
        self._problem = problem
