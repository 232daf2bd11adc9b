"""Byte and character tokenizers: id layout, round trips, errors, task-driven construction."""
from __future__ import annotations

import numpy as np
import pytest

from r1jax.data import tokenizer as tk
from r1jax.tasks import base


def test_byte_ids_are_bytes_plus_three():
  tok = tk.ByteTokenizer()
  assert tok.vocab_size == 259
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.encode("A") == [65 + 3]
  assert tok.encode("é") == [0xC3 + 3, 0xA9 + 3]   # two UTF-8 bytes
  assert tok.encode("hi", add_bos=True, add_eos=True) == [1, 104 + 3, 105 + 3, 2]


def test_byte_round_trip_and_decode_rules():
  tok = tk.ByteTokenizer()
  text = "héllo ∑ <think>1+1</think>"
  assert tok.decode(tok.encode(text)) == text
  ids = [1] + tok.encode("ab") + [0] + tok.encode("c") + [2] + tok.encode("zz")
  assert tok.decode(ids) == "abc"                        # skips bos/pad, stops at eos
  assert tok.decode(np.array(ids, np.int32)) == "abc"    # arrays work too
  assert tok.decode([0xC3 + 3]) == "\ufffd"             # half a character -> replacement
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([259])


def test_char_tokenizer_layout_and_errors():
  tok = tk.CharTokenizer("ab+")
  assert tok.vocab_size == 6
  assert tok.encode("ba+", add_eos=True) == [4, 3, 5, 2]
  assert tok.decode([1, 4, 3, 2, 5]) == "ba"
  with pytest.raises(ValueError, match=r"'c' at position 2"):
    tok.encode("abc")
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([6])
  with pytest.raises(ValueError, match="duplicate"):
    tk.CharTokenizer("aba")
  with pytest.raises(ValueError, match="non-empty"):
    tk.CharTokenizer("")
  with pytest.raises(ValueError, match="expects str"):
    tok.encode(b"ab")


def test_make_tokenizer_and_spec_round_trip():
  char = tk.make_tokenizer("char", alphabet="xyz")
  assert tk.make_tokenizer(spec=char.spec()).alphabet == "xyz"
  assert isinstance(tk.make_tokenizer(spec="byte"), tk.ByteTokenizer)
  with pytest.raises(ValueError, match="unknown tokenizer kind"):
    tk.make_tokenizer("bpe")
  with pytest.raises(ValueError, match="needs an alphabet"):
    tk.make_tokenizer("char")
  with pytest.raises(ValueError, match="unknown tokenizer spec"):
    tk.make_tokenizer(spec="chars:ab")


class _OpenTextTask(base.Task):
  name = "open"

  def source(self, split, seed=0):
    return [base.Example("q", "a")]

  def is_correct(self, completion, **fields):
    return False


def test_for_task_picks_char_for_generated_tasks_and_bytes_otherwise():
  arith = base.get_task("arithmetic")
  tok = tk.for_task(arith)
  assert isinstance(tok, tk.CharTokenizer)
  assert tok.vocab_size < 50
  ex = arith.make_example("+", 47, 85)
  ids = tok.encode(arith.prompt(ex) + ex.trace)
  assert tok.decode(ids) == arith.prompt(ex) + ex.trace
  assert isinstance(tk.for_task(arith, "byte"), tk.ByteTokenizer)
  assert isinstance(tk.for_task(_OpenTextTask()), tk.ByteTokenizer)
  with pytest.raises(ValueError, match="no fixed alphabet"):
    tk.for_task(_OpenTextTask(), "char")


def test_char_tokenizer_words_are_single_tokens_and_round_trip():
  from r1jax import tasks
  from r1jax.data.tokenizer import CharTokenizer, for_task, make_tokenizer
  tok = CharTokenizer("<>/abcdehinkrstw0123456789", words=("<think>", "</think>"))
  ids = tok.encode("<think>12</think>")
  assert len(ids) == 4                      # <think> 1 2 </think>
  assert tok.decode(ids) == "<think>12</think>"
  assert make_tokenizer(spec=tok.spec()).encode("<think>12</think>") == ids
  # A word's characters still encode one by one where the word does not match.
  assert len(tok.encode("<thin")) == 5
  task = tasks.get_task("arithmetic")
  ex = task.examples("train", 1)[0]
  words_tok, plain_tok = for_task(task, "char+words"), for_task(task, "char")
  text = task.prompt(ex) + ex.trace
  assert words_tok.decode(words_tok.encode(text)) == text
  assert len(words_tok.encode(text)) == len(plain_tok.encode(text)) - sum(
      len(w) - 1 for w in ("<think>", "</think>", "<answer>", "</answer>", "User: ", "\nAssistant:"))


def test_char_tokenizer_rejects_bad_words():
  import pytest
  from r1jax.data.tokenizer import CharTokenizer
  with pytest.raises(ValueError, match="outside the alphabet"):
    CharTokenizer("ab", words=("abc",))
  with pytest.raises(ValueError, match="distinct"):
    CharTokenizer("ab", words=("ab", "ab"))
