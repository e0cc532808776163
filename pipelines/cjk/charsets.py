"""The class sets of the CJK builder: which characters to render, in label order.

- `gb2312-1`: GB2312 level 1, the 3,755 common simplified characters of rows 16 to 55, in GB2312
  code order (by pinyin). They are decoded with Python's gb2312 codec from the double-byte codes
  0xB0A1..0xD7F9, skipping the five empty cells at the end of row 55 (0xD7FA..0xD7FE).
- `uro`: the CJK Unified Ideographs block U+4E00..U+9FFF in code point order. The builder keeps
  only those that enough installed faces contain.
- a path to a UTF-8 text file with one character per line, in the order wanted.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

GB2312_LEVEL1 = "gb2312-1"
URO = "uro"
CHARSET_NAMES = (GB2312_LEVEL1, URO)
GB2312_LEVEL1_SIZE = 3755

URO_FIRST = 0x4E00
URO_LAST = 0x9FFF

# Characters that would break a CSV row or a class-per-line file if used as a label.
UNSAFE_LABEL_CHARACTERS = frozenset(',"\'\\')


class CharsetError(ValueError):
    """An unknown class-set name or an invalid character file; the message names the fix."""


def gb2312_level1() -> list[str]:
    """Return the 3,755 GB2312 level-1 characters in code order."""
    characters = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            try:
                characters.append(bytes((row, cell)).decode("gb2312"))
            except UnicodeDecodeError:
                continue
    return characters


def unified_ideographs() -> list[str]:
    """Return every code point of the CJK Unified Ideographs block, U+4E00..U+9FFF."""
    return [chr(code_point) for code_point in range(URO_FIRST, URO_LAST + 1)]


def read_charset_file(path: Path) -> list[str]:
    """Read one character per line, raising CharsetError that names the line of a bad entry."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise CharsetError(f"character file {path} not found") from None
    except UnicodeDecodeError as error:
        raise CharsetError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None

    characters: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        character = line.strip()
        if not character:
            continue
        if len(character) != 1:
            raise CharsetError(f"{path}:{number}: expected one character per line, found {character!r}")
        if not is_safe_label(character):
            raise CharsetError(
                f"{path}:{number}: {character!r} (U+{ord(character):04X}) cannot be a class name; "
                "remove it (control, space and CSV quoting characters are not allowed)"
            )
        if character in seen:
            raise CharsetError(f"{path}:{number}: {character!r} repeats line {seen[character]}")
        seen[character] = number
        characters.append(character)
    if not characters:
        raise CharsetError(f"{path} lists no characters; put one character per line")
    return characters


def is_safe_label(character: str) -> bool:
    """Return True when the character can stand alone as a CSV field and a class-file line."""
    category = unicodedata.category(character)
    return not category.startswith(("C", "Z")) and character not in UNSAFE_LABEL_CHARACTERS


def load_charset(spec: str) -> list[str]:
    """Return the characters of a class-set name (gb2312-1, uro) or of a character file."""
    if spec == GB2312_LEVEL1:
        return gb2312_level1()
    if spec == URO:
        return unified_ideographs()
    path = Path(spec)
    if not path.exists():
        raise CharsetError(
            f"unknown class set {spec!r}; use {' or '.join(CHARSET_NAMES)}, "
            "or the path of a UTF-8 file with one character per line"
        )
    return read_charset_file(path)


def class_name(character: str, label_format: str) -> str:
    """Return the class name of a character: the character itself, or U+XXXX for `codepoint`."""
    if label_format == "codepoint":
        return codepoint_name(character)
    return character


def codepoint_name(character: str) -> str:
    """Return the U+XXXX name of a character, with at least four hex digits."""
    return f"U+{ord(character):04X}"
