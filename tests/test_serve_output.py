"""Incremental detokenization (:class:`ryzlab.serve.output.ChoiceText`): the deltas add up to
one decode of all ids, a multi-byte character cut between tokens is held back, stop strings
still cut the text, and each chunk decodes a bounded window of ids, not the whole output."""
import random

from ryzlab.models import load_tokenizer
from ryzlab.serve.output import ChoiceText

TEXT = "def f(x):\n    return x * 2  # héllo wörld 日本語 🙂\n" * 8


class Counting:
    """The byte tokenizer, recording how many ids each decode call gets."""

    def __init__(self):
        self.tok, self.sizes = load_tokenizer("reference"), []

    def encode(self, s):
        return self.tok.encode(s)

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_deltas_equal_one_decode_and_each_chunk_decodes_a_window():
    tok = Counting()
    ids = tok.encode(TEXT)
    rnd = random.Random(0)
    c = ChoiceText(0, tok)
    out, i = "", 0
    while i < len(ids):
        k = rnd.randint(1, 3)
        d = c.add(ids[i:i + k])
        assert "\ufffd" not in d.text  # a cut multi-byte character waits for its last byte
        out += d.text
        i += k
    c.engine_reason = "length"
    out += c.finish().text
    assert out == c.text == tok.tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 400 and max(tok.sizes) <= 32  # a window of the last ids, not the whole output


def test_stop_string_still_cuts_the_text():
    tok = load_tokenizer("reference")
    ids = tok.encode("abc STOP def")
    c = ChoiceText(0, tok, stop=("STOP",))
    text = "".join(c.add([t]).text for t in ids)
    assert text == "abc " and c.finish_reason == "stop"
