"""Keep a secret (the judge's API key) out of every text that is written, logged or raised.

:class:`Redactor` replaces, with ``***``, every stretch of a text covered by

* the key itself, and any piece of it of at least 8 characters (a server may echo a prefix or a suffix);
* the same for its encodings: URL-encoded (``quote`` and ``quote_plus``), JSON-escaped, and base64 (standard
  and URL-safe alphabets, at the three byte alignments, so the key is caught inside a longer base64 string
  such as ``Basic <b64(user:key)>`` too); pieces of those of at least 8 characters as well;
* a masked form of it: a run of ``*``, ``•`` or ``.`` (3 or more) or ``…`` next to a visible start of the key
  (3+ characters) or a visible end of it (2+ characters), e.g. ``sk-pr****cdef``; the whole token goes;
* anything shaped like an API key (``sk-...``, ``pk-...``, ``hf_...``, 6+ key characters after the prefix).

Matching ignores case. Overlapping hits are merged before replacing, so a key is replaced WHOLE: no prefix,
suffix or middle of it is left beside the ``***``. Pieces shorter than 8 characters that stand alone are left
(they cannot be told from ordinary text). Not covered: other encodings (hex, base32, per-character escapes).
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

__all__ = ["MASK", "Redactor", "redact"]

MASK = "***"
PIECE = 8  # pieces of the key (or of an encoding of it) this long are masked
_KEY_LIKE = re.compile(r"\b(sk|pk|rk|key|hf)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
_MASK_RUN = re.compile(r"\*{3,}|•{3,}|\.{3,}|…")
_VISIBLE_BEFORE = re.compile(r"[A-Za-z0-9_\-]{0,64}\Z")
_VISIBLE_AFTER = re.compile(r"[A-Za-z0-9_\-]{0,64}")


def _base64_cores(data: bytes) -> list[str]:
    """The characters of base64(x + data + y) that depend on `data` alone, for each alignment of `data`."""
    cores = []
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + data).decode("ascii").rstrip("=")
            head = -(-shift * 4 // 3)  # characters touched by the leading filler
            tail = (shift + len(data)) % 3  # a last partial group may change with what follows
            cores.append(text[head : len(text) - (1 if tail else 0)])
    return cores


class Redactor:
    """``redactor(text)``: `text` with every trace of `secret` replaced by ``***`` (see the module docstring).

    Built once per secret (the patterns are compiled here); a None or empty secret still masks key-shaped
    tokens.
    """

    def __init__(self, secret: str | None) -> None:
        self.secret = secret or ""
        pieces: set[str] = set()
        if self.secret:
            forms = {self.secret, quote(self.secret, safe=""), quote_plus(self.secret)}
            forms.add(json.dumps(self.secret)[1:-1])
            forms.update(_base64_cores(self.secret.encode("utf-8")))
            for form in forms:
                size = min(PIECE, len(form))
                if size >= min(PIECE, len(self.secret)) and size > 0:
                    pieces.update(form[i : i + size] for i in range(len(form) - size + 1))
        alternatives = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
        # a lookahead finds a hit at every position, overlapping ones included
        self._pieces = re.compile(f"(?=({alternatives}))", re.IGNORECASE) if pieces else None

    def _is_masked_key(self, visible_start: str, visible_end: str) -> bool:
        key = self.secret.lower()
        start, end = visible_start.lower(), visible_end.lower()
        return bool(key) and (
            (len(start) >= 3 and key.startswith(start)) or (len(end) >= 2 and key.endswith(end))
        )

    def _masked_forms(self, text: str) -> list[tuple[int, int]]:
        """Spans of tokens like ``sk-pr****cdef``: a mask run between a visible start and end of the key."""
        spans = []
        for run in _MASK_RUN.finditer(text):
            before = _VISIBLE_BEFORE.search(text, max(0, run.start() - 64), run.start())
            after = _VISIBLE_AFTER.match(text, run.end())
            if self._is_masked_key(before.group(), after.group()):
                spans.append((before.start(), after.end()))
        return spans

    def __call__(self, text: str) -> str:
        spans: list[tuple[int, int]] = []
        if self._pieces is not None:
            spans += [(m.start(), m.start() + len(m.group(1))) for m in self._pieces.finditer(text)]
        spans += [m.span() for m in _KEY_LIKE.finditer(text)]
        if self.secret:
            spans += self._masked_forms(text)
        if not spans:
            return text
        spans.sort()
        merged = [list(spans[0])]
        for start, end in spans[1:]:
            if start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out, pos = [], 0
        for start, end in merged:
            out += [text[pos:start], MASK]
            pos = end
        out.append(text[pos:])
        return "".join(out)


def redact(text: str, secret: str | None) -> str:
    """`text` with every trace of `secret` replaced by ``***`` (one-off form of :class:`Redactor`)."""
    return Redactor(secret)(text)
