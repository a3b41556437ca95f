r"""Glob patterns over dotted tensor names, compiled to regular expressions.

A pattern is a dotted name whose segments may hold wildcards:

- ``*`` matches any characters within one segment (never a dot);
- ``**`` as a whole segment matches any number of whole segments, zero
  included, so ``**.bias`` matches ``bias`` and ``h.0.attn.bias``;
- ``?`` matches one character other than a dot;
- ``[abc]``, ``[a-z]`` and ``[!abc]`` (or ``[^abc]``) match one character of
  a class, never a dot;
- ``{a,b}`` matches any of the comma-separated alternatives, which may
  themselves hold wildcards and dots (but not nested braces);
- a backslash makes the next character literal (``\*``, ``\.``, ``\{``).

Patterns always match the whole name.
"""

from __future__ import annotations

import re

__all__ = ["GlobError", "compile_glob", "glob_to_regex"]

_SEGMENT_CHAR = r"[^.]"


class GlobError(ValueError):
    """A glob pattern is malformed; the message gives where and why."""


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a dotted-name glob into a regular expression for ``fullmatch``."""
    return re.compile(glob_to_regex(pattern))


def glob_to_regex(pattern: str) -> str:
    """Translate a dotted-name glob into an equivalent regular expression."""
    if not pattern:
        raise GlobError("pattern is empty")
    segments = _split_segments(pattern)
    return _join_segments(segments, pattern)


def _split_segments(pattern: str) -> list[str]:
    """Split on dots that are not escaped and not inside brackets or braces."""
    segments: list[str] = []
    current: list[str] = []
    depth_brace = 0
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                raise GlobError(f"pattern {pattern!r} ends with a lone backslash")
            current.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]" or _is_class_start(current)
        elif char == "[":
            in_class = True
        elif char == "{":
            if depth_brace:
                raise GlobError(
                    f"pattern {pattern!r} nests braces, which is not supported"
                )
            depth_brace = 1
        elif char == "}":
            if not depth_brace:
                raise GlobError(f"pattern {pattern!r} has '}}' without '{{'")
            depth_brace = 0
        elif char == "." and not depth_brace:
            segments.append("".join(current))
            current = []
            i += 1
            continue
        current.append(char)
        i += 1
    if in_class:
        raise GlobError(f"pattern {pattern!r} has '[' without a closing ']'")
    if depth_brace:
        raise GlobError(f"pattern {pattern!r} has '{{' without a closing '}}'")
    segments.append("".join(current))
    if any(segment == "" for segment in segments):
        raise GlobError(
            f"pattern {pattern!r} has an empty segment (a leading, trailing or "
            "doubled dot)"
        )
    return segments


def _is_class_start(current: list[str]) -> bool:
    # A ']' right after '[' (or '[!' / '[^') is a literal member of the class.
    tail = "".join(current[-2:])
    return current[-1:] == ["["] or tail in ("[!", "[^")


def _join_segments(segments: list[str], pattern: str) -> str:
    # Collapse runs of '**': they match exactly what one '**' matches.
    collapsed: list[str] = []
    for segment in segments:
        if segment == "**" and collapsed[-1:] == ["**"]:
            continue
        collapsed.append(segment)

    if collapsed == ["**"]:
        return r"(?s:.*)"

    parts: list[str] = []
    last = len(collapsed) - 1
    # True when the next plain segment must be preceded by an escaped dot.
    need_dot = False
    for index, segment in enumerate(collapsed):
        if segment != "**":
            if need_dot:
                parts.append(r"\.")
            parts.append(_translate_segment(segment, pattern))
            need_dot = True
        elif index == 0:
            # Leading '**.x': zero or more whole segments, each with its dot.
            parts.append(rf"(?:{_SEGMENT_CHAR}+\.)*")
            need_dot = False
        elif index == last:
            # Trailing 'x.**': zero or more further segments.
            parts.append(rf"(?:\.{_SEGMENT_CHAR}+)*")
        else:
            # Middle 'x.**.y': one dot, then zero or more segments with dots.
            parts.append(rf"\.(?:{_SEGMENT_CHAR}+\.)*")
            need_dot = False
    return "".join(parts)


def _translate_segment(segment: str, pattern: str) -> str:
    if "**" in segment.replace("\\*", ""):
        raise GlobError(
            f"pattern {pattern!r}: '**' must be a whole segment, as in 'a.**.b'; "
            f"use '*' inside the segment {segment!r}"
        )
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "\\":
            out.append(re.escape(segment[i + 1]))
            i += 2
        elif char == "*":
            out.append(f"{_SEGMENT_CHAR}*")
            i += 1
        elif char == "?":
            out.append(_SEGMENT_CHAR)
            i += 1
        elif char == "[":
            class_regex, i = _translate_class(segment, i, pattern)
            out.append(class_regex)
        elif char == "{":
            end = _closing_brace(segment, i)
            alternatives = _split_alternatives(segment[i + 1 : end])
            translated = [
                _translate_alternative(alternative, pattern)
                for alternative in alternatives
            ]
            out.append("(?:" + "|".join(translated) + ")")
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _translate_class(segment: str, start: int, pattern: str) -> tuple[str, int]:
    """Translate the class that opens at ``segment[start]``; return its end."""
    i = start + 1
    negate = i < len(segment) and segment[i] in "!^"
    if negate:
        i += 1
    chars: list[str] = []
    # A ']' right after the opening is a member, not the end of the class.
    while i < len(segment) and (segment[i] != "]" or not chars):
        if segment[i] == "\\" and i + 1 < len(segment):
            chars.append(re.escape(segment[i + 1]))
            i += 2
            continue
        chars.append(segment[i])
        i += 1
    if i >= len(segment):
        raise GlobError(f"pattern {pattern!r} has '[' without a closing ']'")
    members = [
        "-" if char == "-" and 0 < index < len(chars) - 1 else _escape_member(char)
        for index, char in enumerate(chars)
    ]
    body = "".join(members)
    _check_class_ranges(body, pattern)
    # A class never matches the segment separator.
    regex = f"[^.{body}]" if negate else f"(?!\\.)[{body}]"
    return regex, i + 1


def _escape_member(char: str) -> str:
    # Members escaped by the pattern arrive already escaped.
    return char if char.startswith("\\") and len(char) > 1 else re.escape(char)


def _check_class_ranges(body: str, pattern: str) -> None:
    try:
        re.compile(f"[{body}]")
    except re.error as error:
        raise GlobError(f"pattern {pattern!r} has an invalid class: {error}") from None


def _closing_brace(segment: str, start: int) -> int:
    i = start + 1
    while segment[i] != "}":
        i += 2 if segment[i] == "\\" else 1
    return i


def _split_alternatives(body: str) -> list[str]:
    alternatives: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            current.append(body[i : i + 2])
            i += 2
            continue
        if body[i] == ",":
            alternatives.append("".join(current))
            current = []
        else:
            current.append(body[i])
        i += 1
    alternatives.append("".join(current))
    return alternatives


def _translate_alternative(alternative: str, pattern: str) -> str:
    # Dots inside braces are literal separators between segments.
    pieces = _split_on_unescaped_dots(alternative)
    return r"\.".join(_translate_segment(piece, pattern) for piece in pieces)


def _split_on_unescaped_dots(text: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if text[i] == ".":
            pieces.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    pieces.append("".join(current))
    return pieces
