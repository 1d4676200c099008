"""sampler_service.text.stops: validation, the earliest occurrence ending in the new text
against a whole-text reference, vLLM's truncation, and HF StopStringCriteria's stopping token."""
from __future__ import annotations

import pytest

from sampler_service.text.detokenize import IncrementalText
from sampler_service.text.stops import StopStrings


@pytest.mark.parametrize("strings, message", [
    (["ok"] * 65, "65 stop strings, at most 64"),
    (["a", "b", "c", ""], r"stop\[3\]"),
    (["a", 7], r"stop\[1\]"),
    (["a", "x" * 257], r"stop\[1\]: 257 characters"),
])
def test_invalid_stop_strings_are_refused_naming_the_index(strings, message):
    with pytest.raises(ValueError, match=message):
        StopStrings(strings)


def test_limits_are_inclusive():
    assert StopStrings(["x" * 256] * 64).lookback == 255
    assert not StopStrings([]) and StopStrings([]).find("abc", 0) is None


def stop_token(stops: StopStrings, chunks: list[str]):
    """(index of the chunk at which `find` stops, the match, the text so far) or None."""
    text = ""
    for n, chunk in enumerate(chunks):
        new_from, text = len(text), text + chunk
        match = stops.find(text, new_from)
        if match:
            return n, match, text
    return None


def reference(strings: list[str], chunks: list[str]):
    """The same, searching each whole text: the first chunk after which some stop string
    occurs; there, the occurrence with the least (start, list index)."""
    text = ""
    for n, chunk in enumerate(chunks):
        text += chunk
        found = [(text.find(s), k) for k, s in enumerate(strings) if s in text]
        if found:
            start, k = min(found)
            return n, start, start + len(strings[k]), k, text
    return None


def test_find_matches_a_whole_text_search():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    word = st.text(alphabet="abc", min_size=1, max_size=5)

    @settings(max_examples=400, deadline=None)
    @given(st.lists(word, min_size=1, max_size=4), st.lists(st.text(alphabet="abc", max_size=4),
                                                            max_size=12))
    def check(strings, chunks):
        stops = StopStrings(strings)
        got, expected = stop_token(stops, chunks), reference(strings, chunks)
        if expected is None:
            assert got is None
            return
        n, match, text = got
        assert (n, match.start, match.end, match.index, text) == expected
        assert match.stop == strings[match.index] == text[match.start:match.end]
        assert StopStrings.truncated(text, match, include=False) == text[:match.start]
        assert StopStrings.truncated(text, match, include=True) == text[:match.end]

    check()


def test_earliest_start_wins_over_list_order():
    stops = StopStrings(["cd", "bcdx", "abc"])
    match = stops.find("xxabcdx", 5)  # "cd" and "bcdx" end in the new text "dx"
    assert (match.start, match.stop) == (3, "bcdx")
    assert StopStrings.truncated("xxabcdx", match, include=False) == "xxa"


def test_a_stop_string_spanning_three_tokens_stops_where_hf_stops(smollm2_tokenizer,
                                                                   smollm2_vocabulary):
    torch = pytest.importorskip("torch")
    from transformers import StopStringCriteria

    ids = smollm2_tokenizer.encode("The quick brown fox jumps over")
    assert [smollm2_tokenizer.decode([i]) for i in ids[1:4]] == [" quick", " brown", " fox"]
    stop = "ick brown fo"  # starts inside " quick", ends inside " fox"
    stops, text = StopStrings(["over", stop]), IncrementalText(smollm2_vocabulary)
    found = None
    for n, token_id in enumerate(ids):
        new_from = len(text)
        text.append(token_id)
        found = stops.find(text.text, new_from)
        if found:
            break
    assert n == 3 and found.stop == stop
    assert StopStrings.truncated(text.text, found, include=False) == "The qu"
    assert StopStrings.truncated(text.text, found, include=True) == "The quick brown fo"

    criteria = StopStringCriteria(smollm2_tokenizer, ["over", stop])
    hf_stops = [bool(criteria(torch.tensor([ids[:k]]), None)[0]) for k in range(1, len(ids) + 1)]
    assert hf_stops.index(True) == n
