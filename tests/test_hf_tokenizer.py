"""HFTokenizer (r1jax/data/tokenizer.py): a checkpoint's tokenizer.json and chat template.

No downloads: each test directory holds a small byte-level BPE tokenizer.json trained with
the `tokenizers` library on generated text, plus a tokenizer_config.json in the style of
Qwen2.5 (ChatML) or of the R1 distills. transformers' own tokenizer over the same files is
the independent reference for ids and rendered templates.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from r1jax.data import tokenizer as tokenizer_lib  # noqa: E402
from r1jax.data.tokenizer import HFTokenizer  # noqa: E402

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
THINK = ["<think>", "</think>"]

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content']"
    " + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% else %}{{ raise_exception('unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


def _corpus(n=400, seed=0):
  rng = random.Random(seed)
  words = ["the", "answer", "is", "think", "step", "sum", "of", "and", "what", "number",
           "prove", "x", "y", "equals", "therefore", "boxed"]
  out = []
  for _ in range(n):
    k = rng.randint(3, 12)
    s = " ".join(rng.choice(words) for _ in range(k))
    out.append(f"{s} {rng.randint(0, 999)} + {rng.randint(0, 99)} = ?")
  return out


def _build(path, specials, added, config: dict):
  os.makedirs(path, exist_ok=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(), trainer)
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in added])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
  return str(path)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("qwen"), QWEN_SPECIALS, [],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                 "chat_template": QWEN_TEMPLATE})


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
  path = _build(tmp_path_factory.mktemp("r1"), R1_SPECIALS, THINK,
                {"bos_token": {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>",
                               "special": True},
                 "eos_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>",
                               "special": True},
                 "chat_template": R1_TEMPLATE})
  with open(os.path.join(path, "config.json"), "w") as f:  # no pad token anywhere: pad = eos
    json.dump({"model_type": "qwen2", "bos_token_id": 0, "eos_token_id": 1}, f)
  return path


def test_special_ids_from_the_checkpoint(qwen_dir, r1_dir):
  q = HFTokenizer(qwen_dir)
  assert (q.bos_id, q.eos_id, q.pad_id) == (None, 2, 0)  # trainer order: specials first
  r = HFTokenizer(r1_dir)
  assert (r.bos_id, r.eos_id, r.pad_id) == (0, 1, 1)
  assert r.vocab_size == 302 and r.encode("<think>") == [300]  # 300 trained + 2 added


def test_encode_decode_round_trip(r1_dir):
  tok = HFTokenizer(r1_dir)
  text = "what is the sum of 12 and 30? ünïcode ✓"
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids) == text
  assert tok.decode(ids[1:-1] + [tok.eos_id, 7, 8]) == text  # stops at eos
  assert len(tok.encode("the answer is")) < len("the answer is")  # merges learned
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([tok.vocab_size])


def test_qwen_has_no_bos(qwen_dir):
  with pytest.raises(ValueError, match="no bos"):
    HFTokenizer(qwen_dir).encode("x", add_bos=True)


def test_chat_templates_render_by_hand(qwen_dir, r1_dir):
  q = HFTokenizer(qwen_dir)
  msgs = [{"role": "user", "content": "What is 2+3?"}]
  assert q.apply_chat_template(msgs) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
  r = HFTokenizer(r1_dir)
  assert r.apply_chat_template(msgs) == "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>\n"
  ids = r.r1_prompt("What is 2+3?")
  assert ids[:2] == [r.bos_id, r.encode("<｜User｜>")[0]] and ids[-2] == r.encode("<think>")[0]
  with pytest.raises(ValueError, match="unsupported role"):
    r.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("which", ["qwen", "r1"])
def test_equal_to_transformers(which, qwen_dir, r1_dir):
  transformers = pytest.importorskip("transformers")
  path = qwen_dir if which == "qwen" else r1_dir
  ref = transformers.AutoTokenizer.from_pretrained(path)
  tok = HFTokenizer(path)
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "prove x = y"},
          {"role": "assistant", "content": "<think>\nstep</think> boxed 4"},
          {"role": "user", "content": "and 12 + 7?"}]
  if which == "r1":
    msgs = msgs[1:]
  want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert tok.apply_chat_template(msgs) == want
  want_ids = ref(want, add_special_tokens=False)["input_ids"]
  assert tok.encode_chat(msgs) == want_ids
  for text in _corpus(20, seed=1):
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
  assert (tok.eos_id, tok.pad_id) == (ref.eos_token_id, ref.pad_token_id if which == "qwen"
                                      else tok.eos_id)


def test_spec_round_trip(r1_dir):
  tok = tokenizer_lib.make_tokenizer(spec=HFTokenizer(r1_dir).spec())
  assert isinstance(tok, HFTokenizer) and tok.encode("sum of 3") == HFTokenizer(r1_dir).encode("sum of 3")


def test_missing_files_raise(tmp_path):
  with pytest.raises(ValueError, match="tokenizer.json"):
    HFTokenizer(str(tmp_path))


def test_sampler_completion_text(r1_dir):
  """completions_text decodes a row's completion with the checkpoint vocabulary."""
  from r1jax.rollout import sampler
  tok = HFTokenizer(r1_dir)
  prompt = tok.r1_prompt("sum")
  done = tok.encode("the answer is 4") + [tok.eos_id]
  width = len(prompt) + len(done) + 2
  row = np.full((1, width), tok.pad_id, np.int32)
  row[0, :len(prompt) + len(done)] = prompt + done
  out = sampler.SampleOutput(tokens=row, completion_mask=None, lengths=np.array([len(done)]),
                             logprobs=None, truncated=None, prompt_lengths=np.array([len(prompt)]),
                             steps=None)
  assert sampler.completions_text(out, tok) == ["the answer is 4"]
