"""Conditional requests over entity tags (RFC 9110 §13.1.1, §13.1.2, §8.8.3.2).

``If-None-Match`` uses the weak comparison (``W/"x"`` matches ``"x"``), ``If-Match`` the
strong one (a weak tag never matches); both take ``*`` or a comma-separated list of
tags, and a tag may itself hold a comma, so the list is parsed, not split."""

from __future__ import annotations

import re
from typing import Literal

# One list element: an entity tag (its opaque part, quotes included), then a comma or
# the end. etagc is %x21 / %x23-7E / obs-text: anything but a quote, a space or a control.
_TAG = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')
_EMPTY = re.compile(r"[ \t]*(?:,|\Z)")


def parse_tags(value: str) -> Literal["*"] | list[tuple[bool, str]] | None:
    """``*``, the list of ``(weak, opaque tag)``, or None when ``value`` is malformed."""
    if value.strip(" \t") == "*":
        return "*"
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        element = _TAG.match(value, pos)
        if element is not None:
            tags.append((element[1] is not None, element[2]))
        elif (element := _EMPTY.match(value, pos)) is None:
            return None
        if element.end() == pos:
            break
        pos = element.end()
    return tags


def _opaque(etag: str) -> str:
    return etag[2:] if etag.startswith("W/") else etag


def none_match(header: str | None, etag: str) -> bool:
    """Whether ``If-None-Match: header`` matches the current ``etag`` (a GET answers 304).
    A malformed header matches nothing."""
    if header is None:
        return False
    tags = parse_tags(header)
    if tags == "*":
        return True  # the resource exists
    current = _opaque(etag)
    return tags is not None and any(tag == current for _, tag in tags)


def if_match_holds(header: str | None, etag: str) -> bool:
    """Whether a request with ``If-Match: header`` may go ahead (412 when not): ``*``, or
    a strong tag equal to the current strong ``etag``. A malformed header never holds."""
    if header is None:
        return True
    tags = parse_tags(header)
    if tags == "*":
        return True
    if tags is None or etag.startswith("W/"):
        return False
    return any(not weak and tag == etag for weak, tag in tags)
