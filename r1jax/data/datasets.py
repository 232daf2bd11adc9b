"""grain pipelines: prompt batches for GRPO and packed rows for SFT and pre-training.

Both are `grain.MapDataset`s over random-access sources, so they get seeded
shuffling (a new order every epoch), per-process sharding and checkpointable
iterators for free: `it = iter(ds)`, `state = it.get_state()` (a small dict),
later `it.set_state(state)` resumes at exactly the next batch.

Prompts (`prompt_dataset`): each host reads a disjoint shard (every
`process_count`-th example starting at `process_index`) and yields `PromptBatch`es
of `global_batch_size // process_count` prompts, left-aligned and padded to a fixed
`max_prompt_len` (static shapes for jit), with their lengths and the `Example`s
whose fields the reward needs: the layout the sampler and the GRPO batch keep.

SFT (`sft_dataset`): each example becomes <bos> prompt response <eos>, with
`loss_mask` 1 exactly on the response tokens (trace and <eos>). Sequences are
packed into rows of `seq_len` tokens, never split across rows (too long ->
ValueError). Per row: `segment_ids` 1, 2, ... per packed sequence and 0 on
padding, `positions` restarting at 0 in every segment. `loss_mask[t]` marks token
t as a target: a trainer compares logits[:, t-1] with tokens[:, t] under
loss_mask[:, t]. Every segment starts with <bos> (mask 0), so no target ever
crosses a segment boundary; attention must still use segment_ids.

Pre-training (`pretrain_dataset`): each example becomes <bos> `task.pretrain_text`
<eos> (plain text: the task's problems never in the template, the tags or a trace; see
`Task.pretrain_text`) with `loss_mask` 1 on every
token, packed and batched exactly as SFT rows.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import jax
import numpy as np

from r1jax.data.tokenizer import Tokenizer
from r1jax.tasks import base

_VALIDATE_GENERATED = 256   # generated sources: check this many prompts at start-up
_MAX_OPEN_ROWS = 64         # first-fit packing looks at most this many open rows


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """A batch of prompts. B = per-process batch, L = max_prompt_len."""
  tokens_BxL: np.ndarray      # int32, padded with pad_id
  lengths_B: np.ndarray       # int32, tokens before padding
  indices_B: np.ndarray       # int64, index of each example in the task source
  prompts: tuple[str, ...]    # the templated prompt texts
  examples: tuple[base.Example, ...]


def _shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need 0 <= process_index < process_count, got {index}, {count}")
  return index, count


def _local_batch(global_batch_size: int, count: int) -> int:
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the process count {count}")
  return global_batch_size // count


def encode_prompt(task: base.Task, example: base.Example, tokenizer: Tokenizer,
                  max_prompt_len: int, add_bos: bool = True) -> list[int]:
  """Token ids of the templated prompt; ValueError naming the example if too long."""
  ids = tokenizer.encode(task.prompt(example), add_bos=add_bos)
  if len(ids) > max_prompt_len:
    raise ValueError(f"{example.uid or 'example'}: prompt has {len(ids)} tokens, more than "
                     f"max_prompt_len={max_prompt_len}")
  return ids


class _EncodePrompt:
  """index -> (index, ids, prompt, example). A class, so grain workers can pickle it."""

  def __init__(self, task, source, tokenizer, max_prompt_len, add_bos):
    self.task, self.source, self.tokenizer = task, source, tokenizer
    self.max_prompt_len, self.add_bos = max_prompt_len, add_bos

  def __call__(self, index):
    example = self.source[int(index)]
    ids = encode_prompt(self.task, example, self.tokenizer, self.max_prompt_len, self.add_bos)
    return int(index), ids, self.task.prompt(example), example


class _CollatePrompts:

  def __init__(self, max_prompt_len: int, pad_id: int):
    self.max_prompt_len, self.pad_id = max_prompt_len, pad_id

  def __call__(self, items) -> PromptBatch:
    tokens_BxL = np.full((len(items), self.max_prompt_len), self.pad_id, np.int32)
    for b, (_, ids, _, _) in enumerate(items):
      tokens_BxL[b, :len(ids)] = ids
    return PromptBatch(
        tokens_BxL=tokens_BxL,
        lengths_B=np.array([len(it[1]) for it in items], np.int32),
        indices_B=np.array([it[0] for it in items], np.int64),
        prompts=tuple(it[2] for it in items), examples=tuple(it[3] for it in items))


def prompt_dataset(task: base.Task, split: str, tokenizer: Tokenizer, *,
                   global_batch_size: int, max_prompt_len: int, seed: int = 0,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None, add_bos: bool = True, validate: bool = True) -> grain.MapDataset:
  """Shuffled, repeated, sharded batches of prompts for GRPO sampling.

  Args:
    task / split: where the examples come from (`task.source(split, seed)`).
    tokenizer: encodes the templated prompts.
    global_batch_size: prompts per step over all processes (each gets 1/count).
    max_prompt_len: fixed padded length; a longer prompt raises ValueError.
    seed: seeds generated sources and the shuffle (reshuffled every epoch).
    num_epochs: None repeats forever.
    process_index / process_count: default to jax.process_index()/process_count().
    add_bos: start every prompt with <bos>.
    validate: encode prompts now so bad data stops at start-up (all of them for
      file-backed sources, the first 256 for generated ones, whose lengths the
      difficulty knobs bound).

  Returns:
    A MapDataset of `PromptBatch` (the last incomplete batch is dropped).
  """
  if max_prompt_len < 1:
    raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
  index, count = _shard(process_index, process_count)
  local_batch = _local_batch(global_batch_size, count)
  source = task.source(split, seed)
  if len(source) < count:
    raise ValueError(f"{split} source of task {task.name!r} has {len(source)} examples, "
                     f"fewer than the {count} processes")
  if validate:
    n = len(source) if not isinstance(source, base.GeneratedSource) else min(
        len(source), _VALIDATE_GENERATED)
    for i in range(n):
      encode_prompt(task, source[i], tokenizer, max_prompt_len, add_bos)
  ds = grain.MapDataset.range(len(source))[index::count]
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(_EncodePrompt(task, source, tokenizer, max_prompt_len, add_bos))
  return ds.batch(local_batch, drop_remainder=True,
                  batch_fn=_CollatePrompts(max_prompt_len, tokenizer.pad_id))


def sft_sequence(task: base.Task, example: base.Example,
                 tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
  """(tokens, loss_mask) of <bos> prompt trace <eos>; mask is 1 on trace and <eos>."""
  if not example.trace:
    raise ValueError(f"{example.uid or 'example'}: has no trace to train on")
  prompt_ids = tokenizer.encode(task.prompt(example), add_bos=True)
  response_ids = tokenizer.encode(example.trace, add_eos=True)
  return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                   pad_id: int = 0, pack: bool = True,
                   max_open_rows: int = _MAX_OPEN_ROWS) -> dict[str, np.ndarray]:
  """Pack (tokens, loss_mask) pairs into rows; arrays of shape [R, seq_len].

  First fit in the given order over at most `max_open_rows` rows that still have
  room (the oldest is closed when more open), so the cost stays linear. With
  pack=False every sequence gets its own row. A sequence is never split: one
  longer than seq_len raises ValueError naming its position.

  Returns:
    tokens, loss_mask, segment_ids (1.. per sequence, 0 = padding), positions
    (0.. within each segment, 0 on padding); all int32.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  rows: list[list[int]] = []   # sequence indices per row
  room: list[int] = []
  open_rows: list[int] = []
  for i, (tokens, mask) in enumerate(sequences):
    n = len(tokens)
    if n != len(mask):
      raise ValueError(f"sequence {i}: {n} tokens but {len(mask)} mask entries")
    if n == 0 or n > seq_len:
      raise ValueError(f"sequence {i} has {n} tokens; it must have 1..seq_len={seq_len} "
                       "(sequences are never split across rows)")
    target = next((r for r in open_rows if room[r] >= n), None) if pack else None
    if target is None:
      target = len(rows)
      rows.append([])
      room.append(seq_len)
      open_rows.append(target)
      if len(open_rows) > max_open_rows:
        open_rows.pop(0)
    rows[target].append(i)
    room[target] -= n
    if room[target] == 0:
      open_rows.remove(target)
  shape = (len(rows), seq_len)
  out = {"tokens": np.full(shape, pad_id, np.int32), "loss_mask": np.zeros(shape, np.int32),
         "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
  for r, members in enumerate(rows):
    start = 0
    for segment, i in enumerate(members, start=1):
      tokens, mask = sequences[i]
      end = start + len(tokens)
      out["tokens"][r, start:end] = tokens
      out["loss_mask"][r, start:end] = mask
      out["segment_ids"][r, start:end] = segment
      out["positions"][r, start:end] = np.arange(len(tokens))
      start = end
  return out


class _Row:
  """index -> one packed row as a dict of [seq_len] arrays (picklable)."""

  def __init__(self, packed: dict[str, np.ndarray]):
    self.packed = packed

  def __call__(self, index):
    return {k: v[int(index)] for k, v in self.packed.items()}


def pretrain_sequence(task: base.Task, example: base.Example,
                      tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
  """(tokens, loss_mask) of <bos> plain text <eos>; the mask is 1 on every token (the
  leading <bos> is never a target: nothing precedes it in its segment)."""
  text = task.pretrain_text(example)
  if not text:
    raise ValueError(f"{example.uid or 'example'}: empty pre-training text")
  tokens = tokenizer.encode(text, add_bos=True, add_eos=True)
  return tokens, [1] * len(tokens)


def _packed_dataset(sequences, uids, tokenizer, *, seq_len, global_batch_size, seed,
                    num_epochs, pack, process_index, process_count) -> grain.MapDataset:
  """Packs (tokens, loss_mask) pairs into rows, then shards, shuffles and batches them."""
  index, count = _shard(process_index, process_count)
  local_batch = _local_batch(global_batch_size, count)
  for (tokens, _), uid in zip(sequences, uids):
    if len(tokens) > seq_len:
      raise ValueError(f"{uid or 'example'}: {len(tokens)} tokens, more than "
                       f"seq_len={seq_len} (sequences are not split)")
  packed = pack_sequences(sequences, seq_len, tokenizer.pad_id, pack=pack)
  num_rows = len(packed["tokens"])
  if num_rows < count:
    raise ValueError(f"{num_rows} packed rows cannot be shared by {count} processes")
  ds = grain.MapDataset.range(num_rows)[index::count]
  if num_epochs is not None and len(ds) * num_epochs < local_batch:
    raise ValueError(f"{len(ds)} rows x {num_epochs} epochs make no batch of {local_batch}")
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(_Row(packed))
  return ds.batch(local_batch, drop_remainder=True)


def _encode_all(encode, task, examples, tokenizer, seed, what):
  if not examples:
    raise ValueError(f"{what} needs at least one example")
  order = np.random.default_rng(seed).permutation(len(examples))
  chosen = [examples[int(i)] for i in order]
  return [encode(task, ex, tokenizer) for ex in chosen], [ex.uid for ex in chosen]


def sft_dataset(task: base.Task, examples: Sequence[base.Example], tokenizer: Tokenizer, *,
                seq_len: int, global_batch_size: int, seed: int = 0,
                num_epochs: int | None = None, pack: bool = True,
                process_index: int | None = None,
                process_count: int | None = None) -> grain.MapDataset:
  """Batches of packed SFT rows: dicts of [B, seq_len] int32 arrays.

  The examples are tokenised and packed once, in an order shuffled by `seed`
  (every example is checked now: a missing trace, an unknown character or a
  sequence longer than seq_len stops here). Rows are then sharded over processes,
  reshuffled every epoch and batched (B = global_batch_size // process_count;
  incomplete last batch dropped). Keys: tokens, loss_mask, segment_ids, positions.
  """
  sequences, uids = _encode_all(sft_sequence, task, examples, tokenizer, seed, "sft_dataset")
  return _packed_dataset(sequences, uids, tokenizer, seq_len=seq_len,
                         global_batch_size=global_batch_size, seed=seed, num_epochs=num_epochs,
                         pack=pack, process_index=process_index, process_count=process_count)


def pretrain_dataset(task: base.Task, examples: Sequence[base.Example], tokenizer: Tokenizer, *,
                     seq_len: int, global_batch_size: int, seed: int = 0,
                     num_epochs: int | None = None, pack: bool = True,
                     process_index: int | None = None,
                     process_count: int | None = None) -> grain.MapDataset:
  """Batches of packed plain-text rows (`pretrain_sequence`: loss on every token), with
  the keys, shuffling, sharding and checks of `sft_dataset`."""
  sequences, uids = _encode_all(pretrain_sequence, task, examples, tokenizer, seed,
                                "pretrain_dataset")
  return _packed_dataset(sequences, uids, tokenizer, seq_len=seq_len,
                         global_batch_size=global_batch_size, seed=seed, num_epochs=num_epochs,
                         pack=pack, process_index=process_index, process_count=process_count)
