"""Tokenizers that need no downloads: bytes for any text, characters for tiny models.

Both share one id layout so code never branches on the kind:

    0 <pad>   1 <bos>   2 <eos>   3.. the symbols (bytes 0..255, or the alphabet)

`ByteTokenizer` covers any UTF-8 text (vocab 259). `CharTokenizer(alphabet)` maps
each character of a fixed alphabet to one id, which keeps the vocabulary of a
generated task tiny (arithmetic needs ~40 ids) and so keeps CPU models fast.
A character outside the alphabet raises `ValueError`: silently dropping it would
let a prompt change meaning without anyone noticing.

`decode` stops at the first <eos> and skips <pad>/<bos>, which is what a sampler
needs to turn a fixed-length row of generated ids back into a completion.

`HFTokenizer` (below; spec 'hf:<dir>') puts an HF checkpoint's own vocabulary and chat
template (Qwen2, Llama students) behind the same interface.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
KINDS = ("byte", "char")


class Tokenizer:
  """The shared interface: `encode`, `decode`, `vocab_size` and the special ids."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def _encode_symbols(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_symbols(self, ids: list[int]) -> str:
    raise NotImplementedError

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text -> ids, optionally framed by <bos> and <eos>."""
    if not isinstance(text, str):
      raise ValueError(f"encode expects str, got {type(text).__name__}")
    ids = self._encode_symbols(text)
    if add_bos:
      ids = [BOS_ID] + ids
    if add_eos:
      ids = ids + [EOS_ID]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text, stopping at the first <eos>; <pad> and <bos> are skipped.

    Accepts lists or 1-D numpy/jax arrays. An id outside the vocabulary raises.
    """
    symbols = []
    for i in ids:
      i = int(i)
      if i < 0 or i >= self.vocab_size:
        raise ValueError(f"token id {i} outside vocabulary of size {self.vocab_size}")
      if i == EOS_ID:
        break
      if i < NUM_SPECIAL:
        continue
      symbols.append(i)
    return self._decode_symbols(symbols)

  def spec(self) -> str:
    """A string that `make_tokenizer(spec=...)` turns back into this tokenizer."""
    raise NotImplementedError


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: byte b has id b + 3. Vocab 259.

  Decoding invalid UTF-8 (a model may emit half a character) uses the U+FFFD
  replacement character rather than raising, because sampled text is not data
  we control; encoding never fails.
  """

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + 256

  def _encode_symbols(self, text: str) -> list[int]:
    return [b + NUM_SPECIAL for b in text.encode("utf-8")]

  def _decode_symbols(self, ids: list[int]) -> str:
    return bytes(i - NUM_SPECIAL for i in ids).decode("utf-8", errors="replace")

  def spec(self) -> str:
    return "byte"

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class CharTokenizer(Tokenizer):
  """One id per character of `alphabet`, plus optional multi-character `words`.

  Ids: the specials, then `words` (ids 3..), then the alphabet's characters. Encoding
  matches the longest word first at each position, else one character, so fixed strings
  such as the R1 tags (<think>, </answer>, ...) cost one token each: a tiny model's
  sequences get much shorter. The alphabet must be non-empty and free of duplicates; order
  matters (it fixes the ids), so build it with `sorted(set(...))` when it comes from data.
  """

  def __init__(self, alphabet: str, words: Iterable[str] = ()):
    if not isinstance(alphabet, str) or not alphabet:
      raise ValueError("CharTokenizer needs a non-empty alphabet string")
    if len(set(alphabet)) != len(alphabet):
      dupes = sorted({c for c in alphabet if alphabet.count(c) > 1})
      raise ValueError(f"alphabet has duplicate characters: {dupes!r}")
    words = tuple(words)
    if len(set(words)) != len(words) or any(len(w) < 2 for w in words):
      raise ValueError(f"words must be distinct strings of 2+ characters, got {words!r}")
    for w in words:
      missing = sorted(set(w) - set(alphabet))
      if missing:
        raise ValueError(f"word {w!r} uses characters outside the alphabet: {missing!r}")
    self.alphabet = alphabet
    self.words = words
    self._symbols = list(words) + list(alphabet)
    self._to_id = {c: i + NUM_SPECIAL for i, c in enumerate(self._symbols)}
    self._by_length = sorted(words, key=len, reverse=True)

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + len(self._symbols)

  def _encode_symbols(self, text: str) -> list[int]:
    ids = []
    pos = 0
    while pos < len(text):
      for w in self._by_length:
        if text.startswith(w, pos):
          ids.append(self._to_id[w])
          pos += len(w)
          break
      else:
        c = text[pos]
        i = self._to_id.get(c)
        if i is None:
          raise ValueError(
              f"character {c!r} at position {pos} is not in the tokenizer alphabet "
              f"({len(self.alphabet)} chars); text starts {text[:40]!r}")
        ids.append(i)
        pos += 1
    return ids

  def _decode_symbols(self, ids: list[int]) -> str:
    return "".join(self._symbols[i - NUM_SPECIAL] for i in ids)

  def spec(self) -> str:
    if not self.words:
      return "char:" + self.alphabet
    return "charw:" + json.dumps([list(self.words), self.alphabet])

  def __repr__(self) -> str:
    if self.words:
      return f"CharTokenizer({self.alphabet!r}, words={self.words!r})"
    return f"CharTokenizer({self.alphabet!r})"


def make_tokenizer(kind: str = "byte", *, alphabet: str | None = None,
                   spec: str | None = None) -> Tokenizer:
  """Build a tokenizer from a config value.

  Args:
    kind: 'byte' or 'char'.
    alphabet: required for 'char'.
    spec: alternatively, the output of `Tokenizer.spec()` ('byte', 'char:<alphabet>', or
      'hf:<dir>' for an HF checkpoint's tokenizer.json, `HFTokenizer`), which
      is how a checkpoint records the tokenizer it was trained with.
  """
  if spec is not None:
    if spec == "byte":
      return ByteTokenizer()
    if spec.startswith("char:"):
      return CharTokenizer(spec[len("char:"):])
    if spec.startswith("charw:"):
      words, alphabet = json.loads(spec[len("charw:"):])
      return CharTokenizer(alphabet, words)
    if spec.startswith("hf:"):
      return HFTokenizer(spec[len("hf:"):])
    raise ValueError(f"unknown tokenizer spec {spec[:20]!r}: expected 'byte', 'char:<alphabet>' "
                     "or 'hf:<checkpoint dir>'")
  if kind == "byte":
    if alphabet is not None:
      raise ValueError("a byte tokenizer takes no alphabet")
    return ByteTokenizer()
  if kind == "char":
    if alphabet is None:
      raise ValueError("a char tokenizer needs an alphabet")
    return CharTokenizer(alphabet)
  raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")


def task_words(task) -> tuple[str, ...]:
  """Fixed strings worth one token each: the R1 tags and the template's literal parts."""
  from r1jax.tasks import base
  parts = [p for p in task.template.split("{question}") if len(p) >= 2]
  return tuple(dict.fromkeys(list(base._TAGS) + parts))


def for_task(task, kind: str = "auto") -> Tokenizer:
  """The tokenizer for a task: its character alphabet when it has one, else bytes.

  Args:
    task: an `r1jax.tasks.base.Task`; `task.alphabet()` returns a string or None.
    kind: 'auto' (char when the task has an alphabet), 'char' (requires one), 'byte', or
      'char+words' (char, with the R1 tags and template parts as single tokens).
  """
  if kind == "byte":
    return ByteTokenizer()
  alphabet = task.alphabet()
  if kind in ("char", "char+words"):
    if alphabet is None:
      raise ValueError(f"task {task.name!r} has open-ended text and no fixed alphabet; "
                       "use the byte tokenizer")
    return CharTokenizer(alphabet, task_words(task) if kind == "char+words" else ())
  if kind == "auto":
    return CharTokenizer(alphabet) if alphabet is not None else ByteTokenizer()
  raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'auto', 'char', 'char+words' "
                   "or 'byte'")


# ---------------------------------------------------------------------------- HF checkpoints

_FILES = ("tokenizer_config.json", "config.json", "generation_config.json")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _content(tok) -> str | None:
  """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
  if isinstance(tok, dict):
    return tok.get("content")
  return tok


class HFTokenizer(Tokenizer):
  """The tokenizer of an HF checkpoint directory (tokenizer.json + tokenizer_config.json).

  R1's distilled students (R1 section 2.4) are HF checkpoints whose vocabulary and prompt
  format come with them: `tokenizer.json` (read with the HF `tokenizers` library) and
  `tokenizer_config.json` (special tokens, `chat_template`). `HFTokenizer` exposes them
  behind r1jax's `Tokenizer` interface (encode / decode / vocab_size / pad, bos, eos ids), so
  the data pipeline, the sampler and the evaluation code run unchanged with a Qwen or Llama
  vocabulary; `apply_chat_template` renders the checkpoint's Jinja chat template as
  transformers does (a sandboxed jinja2 environment with trim_blocks / lstrip_blocks,
  `raise_exception` and a `tojson` filter).

  Special ids: bos / eos / pad are the tokenizer_config.json tokens (a string or an
  AddedToken dict), else the ids of config.json / generation_config.json (eos may be a list:
  the first is `eos_id`, all are in `eos_ids`). Without a pad token, pad = eos (HF's common
  practice for decoder-only models); without a bos token, `bos_id` is None and add_bos raises.

  Needs the [hf] extra (tokenizers, jinja2); nothing is downloaded: pass a local directory.
  """

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError as err:
      raise ImportError("HFTokenizer needs the 'tokenizers' package (pip install r1jax[hf])") from err
    tpath = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tpath):
      raise ValueError(f"no tokenizer.json in {path!r}")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(tpath)
    conf = _read_json(os.path.join(path, "tokenizer_config.json"))
    model_conf = {}
    for name in reversed(_FILES[1:]):  # generation_config.json overrides config.json
      model_conf.update({k: v for k, v in _read_json(os.path.join(path, name)).items()
                         if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None})
    self.chat_template = conf.get("chat_template")
    if isinstance(self.chat_template, list):  # [{'name': 'default', 'template': ...}, ...]
      named = {t.get("name"): t.get("template") for t in self.chat_template}
      self.chat_template = named.get("default", next(iter(named.values()), None))
    self.bos_token = _content(conf.get("bos_token"))
    self.eos_token = _content(conf.get("eos_token"))
    self.bos_id = self._special_id("bos_token", self.bos_token, model_conf.get("bos_token_id"))
    eos_conf = model_conf.get("eos_token_id")
    eos_list = eos_conf if isinstance(eos_conf, list) else ([eos_conf] if eos_conf is not None else [])
    self.eos_id = self._special_id("eos_token", self.eos_token, eos_list[0] if eos_list else None)
    if self.eos_id is None:
      raise ValueError(f"{path!r} names no eos token (tokenizer_config.json 'eos_token' or "
                       "config.json 'eos_token_id'): generation could never stop")
    self.eos_ids = tuple(dict.fromkeys([self.eos_id] + [int(i) for i in eos_list]))
    pad = self._special_id("pad_token", _content(conf.get("pad_token")),
                           model_conf.get("pad_token_id"))
    self.pad_id = self.eos_id if pad is None else pad
    if self.bos_token is None and self.bos_id is not None:
      self.bos_token = self._tok.id_to_token(self.bos_id)
    if self.eos_token is None:
      self.eos_token = self._tok.id_to_token(self.eos_id)

  def _special_id(self, field: str, token: str | None, fallback) -> int | None:
    if token is not None:
      i = self._tok.token_to_id(token)
      if i is None:
        raise ValueError(f"tokenizer_config.json {field!r} {token!r} is not in tokenizer.json's "
                         "vocabulary")
      return i
    return None if fallback is None else int(fallback)

  @property
  def vocab_size(self) -> int:
    """Ids in tokenizer.json, added tokens included (the model's embedding may be larger)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text -> ids (added tokens such as chat markup in the text map to their ids; no
    post-processor specials), optionally framed by bos and eos."""
    if not isinstance(text, str):
      raise ValueError(f"encode expects str, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise ValueError(f"tokenizer {self.path!r} has no bos token")
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text, stopping at the first eos id; pad and bos are skipped (other added
    tokens, e.g. <think>, are kept as text)."""
    out = []
    stop = set(self.eos_ids)
    skip = {self.pad_id} | ({self.bos_id} if self.bos_id is not None else set())
    for i in ids:
      i = int(i)
      if i < 0 or i >= self.vocab_size:
        raise ValueError(f"token id {i} outside vocabulary of size {self.vocab_size}")
      if i in stop:
        break
      if i not in skip:
        out.append(i)
    return self._tok.decode(out, skip_special_tokens=False)

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                          **kwargs) -> str:
    """The checkpoint's chat template rendered over `messages` ([{'role', 'content'}])."""
    if not self.chat_template:
      raise ValueError(f"{self.path!r}: tokenizer_config.json has no 'chat_template'")
    try:
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
      raise ImportError("chat templates need the 'jinja2' package (pip install r1jax[hf])") from err
    for m in messages:
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"each message must be a dict with 'role' and 'content', got {m!r}")

    def raise_exception(message):
      raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(self.chat_template)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token, **kwargs)

  def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat template (the template writes its own bos, if any)."""
    return self.encode(self.apply_chat_template(messages,
                                                add_generation_prompt=add_generation_prompt))

  def r1_prompt(self, question: str) -> list[int]:
    """An R1-style prompt: the question as the single user turn, no system prompt (the usage
    DeepSeek recommends for the R1 distills), then the template's assistant opening."""
    return self.encode_chat([{"role": "user", "content": question}])

  def spec(self) -> str:
    return "hf:" + os.path.abspath(self.path)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"
