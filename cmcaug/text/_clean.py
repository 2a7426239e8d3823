"""Caption clean-up before spaCy sees a caption, with a map back to the caption's own offsets.

HTML entities ("&amp;", "&#x1F436;") are unescaped and blanks (whitespace runs, tabs, &nbsp;, zero-width
spaces) made one plain space: both confuse spaCy's tokenizer and tagger. Grounded spans found in the
clean text are mapped back through the edit, so offsets always index the caption as given.
"""
from __future__ import annotations

import html
import re

# What clean_text rewrites: runs of blanks (whitespace, zero-width spaces, &nbsp; ...), any blank that is not
# a plain space, and HTML entities.
_ZERO_WIDTH = "\u200b\ufeff"  # zero-width space, byte-order mark: invisible word breaks spaCy does not split on
_SPACE = rf"(?:[\s{_ZERO_WIDTH}]|&(?:nbsp|ensp|emsp|thinsp|#0*(?:9|10|13|32|160)|#[xX]0*(?:9|[aA]|[dD]|20|[aA]0));)"
_ENTITY = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
_EDIT = re.compile(rf"{_SPACE}{{2,}}|[^\S ]|[{_ZERO_WIDTH}]|{_ENTITY}")
_BLANK = re.compile(rf"[\s{_ZERO_WIDTH}]+")


def clean_text(text: str) -> tuple[str, list[int] | None, list[int] | None]:
    """`text` with HTML entities unescaped and blanks (whitespace runs, tabs, zero-width spaces) made one
    space, and the way back.

    Returns `(clean, starts, ends)`: clean character k came from `text[starts[k]:ends[k]]`; both maps are
    `None` when nothing changed. A span `[a, b)` of `clean` is `[starts[a], ends[b - 1])` of `text`.
    """
    if _EDIT.search(text) is None:
        return text, None, None
    parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    for m in _EDIT.finditer(text):
        new = html.unescape(m.group())
        new = " " if _BLANK.fullmatch(new) else new
        if new == m.group():
            continue
        parts.append(text[pos:m.start()])
        starts.extend(range(pos, m.start()))
        ends.extend(range(pos + 1, m.start() + 1))
        parts.append(new)
        starts.extend([m.start()] * len(new))
        ends.extend([m.end()] * len(new))
        pos = m.end()
    if pos == 0:
        return text, None, None
    parts.append(text[pos:])
    starts.extend(range(pos, len(text)))
    ends.extend(range(pos + 1, len(text) + 1))
    return "".join(parts), starts, ends
