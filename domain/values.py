"""Validation of user values: what a session's state, metadata and payloads may hold.

Allowed: None, bool, int (64-bit), float, str, bytes, list (tuples become lists), dict with str
keys, datetime, UUID and Decimal. Everything else raises UnsupportedValue naming the key path,
before anything is written. The walk also copies containers, so a caller mutating its own dict
afterwards never changes what the engine holds.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from datetime import UTC, datetime, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

from .errors import InvalidArgument, InvalidSessionId, UnsupportedValue

MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
MAX_DEPTH = 100
MAX_NAME_LENGTH = 256
MAX_LABEL_LENGTH = 256
#: a session's tags, and their characters together: what one catalog row holds for display
#: (their JSON, each " or \ escaped, stays within its 8,192 characters)
MAX_TAGS = 64
MAX_TAGS_TEXT = 2048

#: where a value sits, built only when a message needs it: the root's name, or (parent, key)
#: with a str key of a dict or an int index of a list (a tuple costs a third of the f-string
#: each key would otherwise format on every command)
KeyPath = str | tuple["KeyPath", "str | int"]


def decimal_digits(text: str) -> bool:
    """True when `text` is one or more ASCII digits 0-9: what int() reads as a plain count.
    (str.isdigit() also accepts digits such as '²' that int() refuses, and int() accepts
    '١٢', '+1' and '1_000', none of which this engine writes.)"""
    return text.isascii() and text.isdigit()


def checked_flag(value: object, what: str) -> bool:
    """A yes/no argument, which must be a bool: "no" or 0 would read as what they are not."""
    if type(value) is not bool:
        raise InvalidArgument(f"{what} must be a bool, got {value!r}")
    return value


def small_count(text: str) -> int | None:
    """The number `text` writes in at most 18 ASCII digits (below 10**18), or None: stored
    counts (versions, positions, times in microseconds, swap counts) are never longer, and
    int() of 4,300 digits or more raises ValueError."""
    return int(text) if len(text) <= 18 and decimal_digits(text) else None


def escaped_unprintable(text: str) -> str:
    """`text` as it is when printable, else with what is not (a newline, an escape sequence,
    a lone surrogate) escaped as Python writes it in a literal (\\n, \\x1b, \\udcff)."""
    return text if text.isprintable() else repr(text)[1:-1]


def utf8_encodable(text: str) -> bool:
    """True when `text` can be stored as UTF-8: it holds no lone surrogate (what Python makes
    of bytes it could not decode, in a file name or a command-line argument)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_path(at: KeyPath) -> str:
    """The text of a key path: state.a.b, payload[3]."""
    keys: list[str | int] = []
    while type(at) is tuple:
        at, key = at
        keys.append(key)
    text = str(at)
    for key in reversed(keys):
        text += f"[{key}]" if type(key) is int else f".{key}"
    return text


def checked_copy(value: Any, path: str) -> Any:
    """Return a copy of `value` safe to store, or raise UnsupportedValue naming the path."""
    return _checked(value, path, 0)


def _checked(value: Any, at: KeyPath, depth: int) -> Any:
    kind = type(value)
    if kind is str:
        # msgpack carries UTF-8: a lone surrogate cannot travel (isascii keeps the common case
        # to one C-speed scan)
        if not value.isascii():
            _check_encodable(value, at)
        return value
    if kind is float or kind is bool or value is None:
        return value
    if kind is int:
        if MIN_INT <= value <= MAX_INT:
            return value
        raise UnsupportedValue(key_path(at), "integer outside the 64-bit range")
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise UnsupportedValue(key_path(at), f"nested deeper than {MAX_DEPTH} levels")
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise UnsupportedValue(
                        f"{key_path(at)}[{key!r}]",
                        f"dict key of type {type(key).__name__}, keys must be str",
                    )
                key = str.__str__(key)  # a str subclass (a str-enum): its text, as plain str
            if not key.isascii():
                _check_encodable(key, f"{key_path(at)}[{key!r}]")
            out[key] = _checked(item, (at, key), depth + 1)
        return out
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise UnsupportedValue(key_path(at), f"nested deeper than {MAX_DEPTH} levels")
        return [_checked(item, (at, i), depth + 1) for i, item in enumerate(value)]
    if kind is bytes:
        return value
    if kind is bytearray or kind is memoryview:
        try:
            return bytes(value)
        except (ValueError, TypeError) as error:  # a released memoryview, say
            raise UnsupportedValue(key_path(at), f"{kind.__name__} ({error})") from None
    if kind is datetime:
        return _stored_datetime(value, at)
    if kind is UUID or kind is Decimal:
        return value
    # Subclasses become their base type, by the base type's own conversion: what is stored
    # is the value itself, never what an overridden __str__, isoformat() or __float__ says
    # (a str-enum member is its text, not "Kind.MEMBER"), and what the engine holds equals
    # what a reload gives back.
    if isinstance(value, str):
        return _checked(str.__str__(value), at, depth)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _checked(int.__int__(value), at, depth)
    if isinstance(value, datetime):
        return _stored_datetime(datetime(
            value.year, value.month, value.day, value.hour, value.minute, value.second,
            value.microsecond, value.tzinfo, fold=value.fold), at)
    if isinstance(value, UUID):
        return UUID(int=value.int)
    if isinstance(value, Decimal):
        return Decimal(value)
    if isinstance(value, dict):  # OrderedDict, defaultdict, ...: the items the dict holds
        return _checked(dict(dict.items(value)), at, depth)
    if isinstance(value, list):
        return _checked(list(list.__iter__(value)), at, depth)
    if isinstance(value, tuple):  # a namedtuple: a list, as every tuple
        return _checked(list(tuple.__iter__(value)), at, depth)
    if isinstance(value, bytes):
        return bytes(memoryview(value))  # the buffer, not what an overridden __bytes__ says
    raise UnsupportedValue(key_path(at), f"type {kind.__name__} is not supported")


def _stored_datetime(moment: datetime, at: KeyPath) -> datetime:
    """The datetime as the store gives it back, so what the engine holds equals what a reload
    returns: a zone (ZoneInfo, ...) becomes its fixed UTC offset at that instant, a named
    offset loses its name, and fold is 0."""
    tz = moment.tzinfo
    if tz is not None and tz is not UTC:
        try:
            offset = moment.utcoffset()
        except Exception as error:  # a user's tzinfo: it may raise anything
            raise UnsupportedValue(
                key_path(at), f"datetime whose tzinfo gives no UTC offset ({error!r})") from None
        if offset is not None:
            # a fixed offset is stored as its offset only: a name (timezone(offset, "CET"))
            # is lost
            return moment.replace(tzinfo=timezone(offset), fold=0)
        # a tzinfo that gives no offset makes a naive datetime, and is stored as one
        return moment.replace(tzinfo=None, fold=0)
    # the stored text has no fold: the second 01:30 of a fall-back (fold=1) reads as the first
    return moment.replace(fold=0) if moment.fold else moment


def _check_encodable(text: str, at: KeyPath) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UnsupportedValue(
            key_path(at),
            f"str with a lone surrogate at position {error.start} is not valid Unicode",
        ) from None


def same_value(a: Any, b: Any) -> bool:
    """Exact equality of stored values, stricter than ==.

    Python's == says 1 == 1.0 == True, Decimal("1.0") == Decimal("1.00"), equal instants in two
    UTC offsets are equal, and NaN != NaN; each of those would make a delta drop a real change
    (or write a change that is none). Floats compare by their bits (0.0 and -0.0 differ), except
    that every NaN is the same value: float("nan") and inf - inf (a NaN with its sign bit set
    on x86) are both "not a number".
    """
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if kind is list:
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if kind is float:
        if a != a:  # NaN
            return bool(b != b)
        return bool(struct.pack("<d", a) == struct.pack("<d", b))
    if kind is Decimal:
        return str(a) == str(b)
    if kind is datetime:
        return bool(a == b and a.utcoffset() == b.utcoffset())
    return bool(a == b)


def checked_mapping(value: Any, path: str) -> dict[str, Any]:
    """A dict of storable values (state, metadata, a delta)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnsupportedValue(path, f"expected a dict, got {type(value).__name__}")
    result: dict[str, Any] = _checked(value, path, 0)
    return result


def checked_text(value: Any, what: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A non-empty name or label of at most `max_length` characters."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(f"{what} is {len(value)} characters long, at most {max_length}")
    # isprintable() is false for every control character (C0, DEL, C1) and surrogate, and also
    # for separators such as U+00A0, which are allowed: look closer only when it is false
    if not value.isprintable():
        for char in value:
            category = unicodedata.category(char)
            if category == "Cc":
                raise InvalidArgument(
                    f"{what} must not contain control characters (U+{ord(char):04X})"
                )
            if category == "Cs":
                raise InvalidArgument(f"{what} must be valid Unicode (a lone surrogate)")
    return str.__str__(value)  # a str subclass's text, as plain str (a str-enum member)


def checked_search_text(value: Any, what: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A name or tag to search for: what checked_text takes, and the control characters other
    than NUL that the first releases stored in names and tags (so their sessions can be found);
    never a lone surrogate or a NUL, which no database can hold."""
    if isinstance(value, str) and value.isprintable():
        return checked_text(value, what, max_length)  # the common case, and its messages
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        return checked_text(value, what, max_length)  # raises, with its message
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL (U+0000)")
    if not utf8_encodable(value):
        raise InvalidArgument(f"{what} must be valid Unicode (a lone surrogate)")
    return str.__str__(value)


def checked_optional_text(value: Any, what: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """None, or a checked_text."""
    return None if value is None else checked_text(value, what, max_length)


def checked_tags(value: Any) -> list[str]:
    """A list of distinct non-empty tags, order kept: at most MAX_TAGS of them, of at most
    MAX_TAGS_TEXT characters together."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise InvalidArgument(f"tags must be a list of str, got {type(value).__name__}")
    tags: list[str] = []
    seen: set[str] = set()
    for tag in value:
        text = checked_text(tag, "tag", MAX_LABEL_LENGTH)
        if text not in seen:
            seen.add(text)
            tags.append(text)
            if len(tags) > MAX_TAGS:
                raise InvalidArgument(f"a session has at most {MAX_TAGS} tags")
    length = sum(map(len, tags))
    if length > MAX_TAGS_TEXT:
        raise InvalidArgument(
            f"the tags are {length} characters together, at most {MAX_TAGS_TEXT}")
    return tags


#: a session id already in canonical form (what str(UUID(...)) gives): taken as it is, without
#: building a UUID (2.5 µs of a 45 µs cold load; the match costs 0.3)
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_canonical_id(text: str) -> bool:
    """True when `text` is a session id as the store writes it (lower-case hex and dashes)."""
    return _CANONICAL_ID.fullmatch(text) is not None


def parse_session_id(value: object) -> str:
    """The canonical string form of a session id (a UUID or its text), or InvalidSessionId."""
    if type(value) is str and _CANONICAL_ID.fullmatch(value):
        return value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(UUID(value))
        except ValueError:
            pass
    raise InvalidSessionId(value)
