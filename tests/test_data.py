"""grain pipelines: prompt batches (padding, sharding, shuffling, resume) and SFT packing."""
from __future__ import annotations

import numpy as np
import pytest

from r1jax.data import datasets as data
from r1jax.data.tokenizer import CharTokenizer, for_task
from r1jax.tasks import base


class _ListTask(base.Task):
  """Questions '0'..'n-1' with the template '{question}=' (one char per digit)."""

  name = "list"

  def __init__(self, n: int = 10):
    super().__init__("{question}=")
    self._examples = [base.Example(str(i), str(i), trace=f"<think></think><answer>{i}</answer>",
                                   uid=f"list/{i}") for i in range(n)]

  def source(self, split, seed=0):
    return self._examples

  def is_correct(self, completion, **fields):
    return False

  def alphabet(self):
    return "".join(sorted(set("0123456789=<>/thinkaswer")))


def _tok():
  return CharTokenizer(_ListTask().alphabet())


def _batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_prompt_batch_tokens_hand_checked():
  task, tok = _ListTask(12), _tok()
  ds = data.prompt_dataset(task, "train", tok, global_batch_size=3, max_prompt_len=5,
                           process_index=0, process_count=1)
  b = next(iter(ds))
  assert b.tokens_BxL.shape == (3, 5) and b.tokens_BxL.dtype == np.int32
  for row, length, idx, prompt, ex in zip(b.tokens_BxL, b.lengths_B, b.indices_B, b.prompts,
                                          b.examples):
    assert ex is task.source("train")[idx] and prompt == f"{idx}="
    want = [tok.bos_id] + tok.encode(f"{idx}=")
    assert length == len(want) == (3 if idx < 10 else 4)
    assert row.tolist() == want + [tok.pad_id] * (5 - len(want))


def test_prompts_shuffle_every_epoch_and_cover_each_example_once():
  task, tok = _ListTask(12), _tok()
  ds = data.prompt_dataset(task, "train", tok, global_batch_size=4, max_prompt_len=5, seed=7,
                           num_epochs=2, process_index=0, process_count=1)
  order = [int(i) for b in ds for i in b.indices_B]
  assert len(order) == 24
  first, second = order[:12], order[12:]
  assert sorted(first) == sorted(second) == list(range(12))
  assert first != second and first != list(range(12))
  again = data.prompt_dataset(task, "train", tok, global_batch_size=4, max_prompt_len=5, seed=7,
                              num_epochs=2, process_index=0, process_count=1)
  assert [int(i) for b in again for i in b.indices_B] == order
  other = data.prompt_dataset(task, "train", tok, global_batch_size=4, max_prompt_len=5, seed=8,
                              num_epochs=1, process_index=0, process_count=1)
  assert [int(i) for b in other for i in b.indices_B] != first


def test_prompts_shard_over_processes():
  task, tok = _ListTask(12), _tok()
  seen = []
  for p in range(2):
    ds = data.prompt_dataset(task, "train", tok, global_batch_size=4, max_prompt_len=5,
                             num_epochs=1, process_index=p, process_count=2)
    batches = list(ds)
    assert all(b.tokens_BxL.shape == (2, 5) for b in batches)
    seen.append({int(i) for b in batches for i in b.indices_B})
  assert seen[0] == set(range(0, 12, 2)) and seen[1] == set(range(1, 12, 2))


def test_prompt_iterator_resumes_exactly():
  task = base.get_task("arithmetic")
  tok = for_task(task)
  ds = data.prompt_dataset(task, "train", tok, global_batch_size=8, max_prompt_len=32, seed=1,
                           process_index=0, process_count=1)
  reference = _batches(ds, 6)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = iter(ds)
  resumed.set_state(state)
  for want in reference[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got.tokens_BxL, want.tokens_BxL)
    assert got.examples == want.examples


def test_prompt_dataset_validates_at_start_up():
  task, tok = _ListTask(12), _tok()
  with pytest.raises(ValueError, match="list/10: prompt has 4 tokens, more than max_prompt_len=3"):
    data.prompt_dataset(task, "train", tok, global_batch_size=2, max_prompt_len=3,
                        process_index=0, process_count=1)
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    data.prompt_dataset(task, "train", tok, global_batch_size=3, max_prompt_len=8,
                        process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    data.prompt_dataset(task, "train", tok, global_batch_size=2, max_prompt_len=8,
                        process_index=2, process_count=2)
  with pytest.raises(ValueError, match="not in the tokenizer alphabet"):
    data.prompt_dataset(task, "train", CharTokenizer("0123456789"), global_batch_size=2,
                        max_prompt_len=8, process_index=0, process_count=1)


def test_pack_sequences_hand_checked():
  seqs = [([11, 12, 13, 14], [0, 0, 1, 1]), ([21, 22, 23], [0, 1, 1]), ([31], [1])]
  out = data.pack_sequences(seqs, seq_len=5)
  # First fit: row 0 = seq 0 (room 1), row 1 = seq 1 (room 2); seq 2 fits row 0.
  np.testing.assert_array_equal(out["tokens"], [[11, 12, 13, 14, 31], [21, 22, 23, 0, 0]])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 2], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 0], [0, 1, 2, 0, 0]])
  unpacked = data.pack_sequences(seqs, seq_len=5, pack=False)
  np.testing.assert_array_equal(unpacked["segment_ids"],
                                [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  with pytest.raises(ValueError, match="sequence 0 has 4 tokens"):
    data.pack_sequences(seqs, seq_len=3)
  with pytest.raises(ValueError, match="mask entries"):
    data.pack_sequences([([1, 2], [1])], seq_len=4)


def test_sft_rows_keep_every_example_whole_with_exact_masks():
  task = base.get_task("arithmetic")
  tok = for_task(task)
  examples = task.examples("train", 25)
  ds = data.sft_dataset(task, examples, tok, seq_len=256, global_batch_size=1, seed=3,
                        num_epochs=1, process_index=0, process_count=1)
  rows = [{k: v[0] for k, v in batch.items()} for batch in ds]
  assert len(rows) < len(examples)                               # packing happened
  assert rows[0]["tokens"].shape == (256,)
  found = []
  for row in rows:
    seg = row["segment_ids"]
    assert (row["tokens"][seg == 0] == tok.pad_id).all()
    assert (row["loss_mask"][seg == 0] == 0).all() and (row["positions"][seg == 0] == 0).all()
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert (np.diff(where) == 1).all()                         # contiguous
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
      tokens, mask = row["tokens"][where].tolist(), row["loss_mask"][where].tolist()
      assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and mask[0] == 0
      n_prompt = mask.index(1)
      prompt, response = tok.decode(tokens[:n_prompt]), tok.decode(tokens[n_prompt:])
      assert all(m == 1 for m in mask[n_prompt:])
      found.append((prompt, response))
  # Every example exactly once per epoch, none split.
  assert sorted(found) == sorted((task.prompt(ex), ex.trace) for ex in examples)


def test_sft_iterator_resumes_and_bad_input_stops():
  task = base.get_task("arithmetic")
  tok = for_task(task)
  examples = task.examples("train", 40)
  ds = data.sft_dataset(task, examples, tok, seq_len=96, global_batch_size=2, seed=0,
                        process_index=0, process_count=1)
  reference = _batches(ds, 12)  # more than one epoch
  it = iter(ds)
  for _ in range(7):
    next(it)
  resumed = iter(ds)
  resumed.set_state(it.get_state())
  for want in reference[7:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ValueError, match="has no trace"):
    data.sft_dataset(task, [base.Example("1+1", "2", uid="u1")], tok, seq_len=64,
                     global_batch_size=1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"arithmetic/train/\d+: \d+ tokens, more than seq_len=20"):
    data.sft_dataset(task, examples, tok, seq_len=20, global_batch_size=1,
                     process_index=0, process_count=1)
