"""`clean_text`: the caption clean-up spaCy sees, and the offset map that brings spans back to the caption.

How grounded spans come through it end to end is in tests/test_grounding.py.
"""
from __future__ import annotations

from cmcaug.text._clean import clean_text


def test_clean_text_maps_every_character_back():
    text = "a&amp;b  c\t&nbsp;d &bogus; &#x1F436;"
    clean, starts, ends = clean_text(text)
    assert clean == "a&b c d &bogus; 🐶"
    assert len(starts) == len(ends) == len(clean)
    assert [text[starts[k]:ends[k]] for k in (1, 3, 5)] == ["&amp;", "  ", "\t&nbsp;"]
    assert clean_text("plain text") == ("plain text", None, None)
    assert clean_text("a \u200b\tb\ufeff")[0] == "a b "
