import pytest

from xlsr_jax.data.inventory import character_inventory, count_chars, format_inventory
from xlsr_jax.data.sources import Example, parse_source
from xlsr_jax.text import TextNormalization


def test_count_chars_most_frequent_first_with_first_word():
    rows = count_chars(["ab a", "b\u0301c"])
    assert [(r.char, r.count, r.example) for r in rows] == \
        [("a", 2, "ab"), ("b", 2, "ab"), ("c", 1, "b\u0301c"), ("\u0301", 1, "b\u0301c")]
    assert (rows[0].code, rows[0].name) == ("U+0061", "LATIN SMALL LETTER A")


def test_inventory_of_a_common_voice_folder_before_and_after(cv_dir):
    examples = parse_source(f"cv:{cv_dir}")  # train: 4 Turkish sentences
    inventory = character_inventory(examples, TextNormalization(language="tr").resolved())
    before = {r.char: r for r in inventory.before}
    after = {r.char: r for r in inventory.after}
    assert (before['"'].count, before["İ"].example, before["I"].count) == (4, "İstanbul'da", 2)
    assert after["ı"].count == 2 and after["ı"].example == "ışık"  # IŞIK lowercased the Turkish way
    assert not {'"', "'", ",", "!", "İ", "I"} & after.keys()
    assert inventory.utterances == 4
    text = format_inventory(inventory)
    (line,) = [line for line in text.splitlines() if line.startswith("  ı ")]
    assert line.split() == ["ı", "U+0131", "2", "LATIN", "SMALL", "LETTER", "DOTLESS", "I", "ışık"]
    assert text.endswith(f"characters_before: {len(before)}\ncharacters_after: {len(after)}\n")
    assert "language tr, NFKC, lowercase True, apostrophes removed" in text


def test_inventory_normalises_each_utterance_by_its_locale():
    examples = [Example("a.wav", "IŞIK", language="tr"), Example("b.wav", "IT'S", language="en")]
    after = {r.char for r in character_inventory(examples, TextNormalization()).after}
    assert {"ı", "'", "i"} <= after  # tr: I -> ı; en: I -> i and the apostrophe kept


@pytest.mark.parametrize("char, shown", [("\u0301", "\u25cc\u0301"), ("\u200b", "\\u200b"), ("a", "a")])
def test_invisible_and_combining_characters_are_shown_visibly(char, shown):
    from xlsr_jax.data.inventory import _shown

    assert _shown(char) == shown
