"""Task generators, traces and rewards on hand-checked examples; JSONL and TFDS validation."""
from __future__ import annotations

import json
import os
import re

import pytest

from r1jax.data.tokenizer import for_task
from r1jax.tasks import base, code_task, countdown, jsonl

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def _resp(think: str, answer: str) -> str:
  return f"<think>{think}</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------- format

def test_parse_response_accepts_only_the_r1_format():
  assert base.parse_response("<think>a</think><answer> 12 </answer>") == ("a", "12")
  assert base.parse_response(" <think>a</think>\n <answer>12</answer>\n") == ("a", "12")
  assert base.parse_response("<answer>12</answer>") is None                    # no think
  assert base.parse_response("<think>a</think>12") is None                     # no answer
  assert base.parse_response("<answer>1</answer><think>a</think>") is None     # order
  assert base.parse_response("so <think>a</think><answer>1</answer>") is None  # text outside
  assert base.parse_response("<think>a</think><answer>1</answer> 2") is None
  assert base.parse_response("<think>a</think><answer>1</answer><answer>2</answer>") is None
  assert base.parse_response("<think><think>a</think><answer>1</answer>") is None


def test_templates():
  ex = base.Example(question="x^{2} = {4}?", answer="2")
  r1 = base.get_task("arithmetic", template="r1_zero")
  assert r1.prompt(ex).endswith("User: x^{2} = {4}?. Assistant:")
  assert "<think> reasoning process here </think>" in r1.prompt(ex)
  assert base.get_task("arithmetic").prompt(ex) == "User: x^{2} = {4}?\nAssistant:"
  assert base.get_task("arithmetic", template="Q {question} A").prompt(ex) == "Q x^{2} = {4}? A"
  with pytest.raises(ValueError, match="question"):
    base.get_task("arithmetic", template="no placeholder")


def test_registry_rejects_unknown_names_and_options():
  assert {"arithmetic", "countdown", "code", "gsm8k", "math", "mbpp", "tfds"} <= set(
      base.task_names())
  with pytest.raises(ValueError, match="unknown task"):
    base.get_task("sudoku")
  with pytest.raises(ValueError, match=r"no option\(s\) \['digits'\]"):
    base.get_task("arithmetic", digits=3)
  with pytest.raises(ValueError, match="unknown split"):
    base.get_task("arithmetic").source("validation")


# ----------------------------------------------------------------------------- arithmetic

def test_arithmetic_traces_hand_checked():
  t = base.get_task("arithmetic", ops=("+", "-", "*"))
  ex = t.make_example("+", 47, 85)
  assert (ex.question, ex.answer) == ("47+85", "132")
  assert ex.trace == _resp("7+5+0=12;4+8+1=13", "132")
  assert t.make_example("-", 52, 17).trace == _resp("2-7-0=-5;5-1-1=3", "35")
  assert t.make_example("-", 17, 52).trace == _resp("neg;2-7-0=-5;5-1-1=3", "-35")
  assert t.make_example("*", 47, 85).trace == _resp("47*5=235;47*80=3760;235+3760=3995", "3995")
  assert t.make_example("+", 5, 999).trace == _resp("5+9+0=14;0+9+1=10;0+9+1=10", "1004")


def test_arithmetic_reward():
  t = base.get_task("arithmetic")
  kw = t.make_example("+", 47, 85).reward_kwargs()
  assert t.reward("p", _resp("whatever", "132"), **kw) == 1.0
  assert t.reward("p", _resp("", " 132 "), **kw) == 1.0
  assert t.reward("p", _resp("", "133"), **kw) == 0.0
  assert t.reward("p", _resp("", "132.0"), **kw) == 0.0
  assert t.reward("p", _resp("", "1 32"), **kw) == 0.0
  assert t.reward("p", "132", **kw) == 0.0
  assert t.reward("p", "<answer>132</answer>", **kw) == 0.0
  assert t.reward("p", _resp("", "132") + "<answer>5</answer>", **kw) == 0.0
  assert t.reward("p", _resp("", "-35"), **t.make_example("-", 17, 52).reward_kwargs()) == 1.0


def test_arithmetic_generation_knobs_determinism_and_disjoint_splits():
  t = base.get_task("arithmetic", train_digits=(2, 3), test_digits=(4, 4), test_size=50)
  train = t.examples("train", 200, seed=1)
  assert train == t.examples("train", 200, seed=1)
  assert train != t.examples("train", 200, seed=2)
  for ex in train:
    a, b = ex.question.split("+")
    assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3
    assert int(ex.answer) == int(a) + int(b)
    assert t.reward("", ex.trace, **ex.reward_kwargs()) == 1.0
  assert all(len(x) == 4 for ex in t.examples("test") for x in ex.question.split("+"))
  # Same digit range for both splits: the hash partition still keeps them apart.
  small = base.get_task("arithmetic", ops=("+", "*"), train_digits=(1, 2), test_digits=(1, 2),
                        train_size=3000, test_size=300)
  train_q = {ex.question for ex in small.examples("train", seed=0)}
  test_q = {ex.question for ex in small.examples("test", seed=0)}
  assert len(test_q) > 50 and not train_q & test_q


@pytest.mark.parametrize("kwargs", [
    dict(ops=("/",)), dict(ops=()), dict(train_digits=(0, 2)), dict(test_digits=(3, 2)),
    dict(train_digits=5), dict(test_fraction=1.0)])
def test_arithmetic_rejects_bad_config(kwargs):
  with pytest.raises(ValueError):
    base.get_task("arithmetic", **kwargs)


# ----------------------------------------------------------------------------- countdown

def test_countdown_evaluator_hand_checked():
  ev = countdown.evaluate_answer
  assert ev("(5/2)*4") == (10, [5, 2, 4])
  assert ev(" 3 + 5*7 ") == (38, [3, 5, 7])
  for bad in ["7/(5-5)*3", "-3+5", "2**3", "7//2", "abs(3)", "__import__('os')", "1_0",
              "2.5*2", "3 5", "", "x", "(1+2", "1" * 300]:
    assert ev(bad) is None, bad


def test_countdown_reward_rules():
  t = base.get_task("countdown")
  kw = {"numbers": [3, 5, 7], "target": 15, "answer": "3+5+7"}
  assert t.reward("", _resp("", "3+5+7"), **kw) == 1.0
  assert t.reward("", _resp("", "(7 + 3) + 5"), **kw) == 1.0
  assert t.reward("", _resp("", "3*5"), **kw) == 0.0          # 7 not used (exactly once)
  assert t.reward("", _resp("", "5+5+5"), **kw) == 0.0        # reuses 5, not given 3 and 7
  assert t.reward("", _resp("", "3*5+7-7"), **kw) == 0.0      # reuses 7
  assert t.reward("", _resp("", "2*7+1"), **kw) == 0.0        # numbers not given
  assert t.reward("", _resp("", "3+5+7+0"), **kw) == 0.0      # 0 not given
  assert t.reward("", _resp("", "7/(5-5)+3"), **kw) == 0.0    # division by zero
  assert t.reward("", _resp("", "3+5+7=15"), **kw) == 0.0     # not an expression
  assert t.reward("", _resp("", "__import__('os')"), **kw) == 0.0
  assert t.reward("", "3+5+7", **kw) == 0.0                    # malformed
  assert t.reward("", _resp("", "(5/2)*4"), numbers=[5, 2, 4], target=10) == 1.0
  at_most = base.get_task("countdown", use_all=False)
  assert at_most.reward("", _resp("", "3*5"), **kw) == 1.0
  assert at_most.reward("", _resp("", "5*3*5/5"), **kw) == 0.0


def test_countdown_solver_and_generator():
  t = base.get_task("countdown", test_size=20)
  ex = t.make_example([3, 5, 7], 15)
  assert t.check_equation(ex.answer, [3, 5, 7], 15)
  with pytest.raises(ValueError, match="not reachable"):
    t.make_example([1, 1], 50)
  step_re = re.compile(r"\A(\d+)([-+*/])(\d+)=(\d+)\Z")
  for ex in t.examples("train", 40) + t.examples("test"):
    numbers, target = ex.fields["numbers"], ex.fields["target"]
    assert 3 <= len(numbers) <= 4 and all(1 <= n <= 99 for n in numbers)
    assert 1 <= target <= 100
    assert t.reward("", ex.trace, **ex.reward_kwargs()) == 1.0
    steps = base.parse_response(ex.trace)[0].split(";")
    assert len(steps) == len(numbers) - 1
    for s in steps:
      a, op, b, c = step_re.match(s).groups()
      assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
              "/": int(a) / int(b)}[op] == int(c)
    assert int(step_re.match(steps[-1]).group(4)) == target
  train_keys = {(tuple(sorted(e.fields["numbers"])), e.fields["target"])
                for e in t.examples("train", 300)}
  test_keys = {(tuple(sorted(e.fields["numbers"])), e.fields["target"])
               for e in t.examples("test")}
  assert not train_keys & test_keys


# ----------------------------------------------------------------------------- code

def test_code_task_reference_solutions_pass_their_tests():
  t = base.get_task("code", train_size=200, test_size=50)
  seen = set()
  for ex in t.examples("train", 120) + t.examples("test"):
    seen.add(ex.fields["family"])
    assert len(ex.fields["tests"]) == code_task.NUM_TESTS
    namespace = {}
    exec(ex.answer, namespace)  # our own reference code, not model output  # noqa: S102
    for test in ex.fields["tests"]:
      assert test["fn"] == "f"
      assert namespace["f"](*test["args"]) == test["expected"]
    assert f"```python\n{ex.answer}\n```" in ex.trace
  assert seen == set(code_task.FAMILIES)
  train_q = {ex.question for ex in t.examples("train")}
  assert not train_q & {ex.question for ex in t.examples("test")}


def test_code_reward_is_zero_for_malformed_completions_without_running_anything():
  t = base.get_task("code")
  kw = t.examples("train", 1)[0].reward_kwargs()
  assert t.reward("", "def f(x): return x", **kw) == 0.0
  assert t.reward("", "```python\ndef f(x): return x\n```", **kw) == 0.0
  with pytest.raises(ValueError, match="at least one test"):
    code_task.score_code_completion(_resp("", "x"), [])
  with pytest.raises(ValueError, match="families"):
    base.get_task("code", families=("sorting",))


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "code"])
def test_generated_prompts_and_traces_fit_the_char_alphabet(name):
  t = base.get_task(name)
  tok = for_task(t)
  for ex in t.examples("train", 30) + t.examples("test", 10):
    text = t.prompt(ex) + ex.trace
    assert tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------- JSONL

def test_jsonl_fixtures_parse():
  g = base.get_task("gsm8k", train_path=os.path.join(FIXTURES, "gsm8k_tiny.jsonl"))
  ex = g.examples("train")
  assert [e.answer for e in ex] == ["29", "255", "3600"]
  assert ex[0].trace == _resp("She starts with 3*12=36 pencils.\nAfter giving some away she "
                              "has 36-7=29 pencils.", "29")
  assert ex[2].uid.endswith("gsm8k_tiny.jsonl:4")   # a blank line 3 still counts
  m = base.get_task("math", test_path=os.path.join(FIXTURES, "math_tiny.jsonl"))
  assert [e.answer for e in m.examples("test")] == ["\\frac{5}{6}", "4", "5\\sqrt{2}"]
  with pytest.raises(ValueError, match="no train_path"):
    m.source("train")
  b = base.get_task("mbpp", train_path=os.path.join(FIXTURES, "mbpp_tiny.jsonl"))
  first, second = b.examples("train")
  assert first.fields["tests"][0] == {"fn": "sum_squares", "args": [[1, 2, 3]], "expected": 14}
  assert first.answer == "def sum_squares(xs):\n  return sum(x * x for x in xs)"  # CRLF gone
  assert second.fields["tests"][1] == {"fn": "swap", "args": [("a", "b")], "expected": ("b", "a")}
  assert "assert swap((1, 2)) == (2, 1)" in second.question


def test_math_rewards_use_the_verifier():
  m = base.get_task("math", train_path=os.path.join(FIXTURES, "math_tiny.jsonl"))
  ex = m.examples("train")[0]
  assert m.reward("", ex.trace, **ex.reward_kwargs()) == 1.0
  assert m.reward("", _resp("", "\\boxed{\\frac{10}{12}}"), **ex.reward_kwargs()) == 1.0
  assert m.reward("", _resp("", "5/7"), **ex.reward_kwargs()) == 0.0
  assert m.reward("", "\\boxed{\\frac{5}{6}}", **ex.reward_kwargs()) == 0.0   # malformed
  g = base.get_task("gsm8k", train_path=os.path.join(FIXTURES, "gsm8k_tiny.jsonl"))
  kw = g.examples("train")[2].reward_kwargs()
  assert g.reward("", _resp("", "3600"), **kw) == 1.0
  assert g.reward("", _resp("", "3,600"), **kw) == 1.0
  assert g.reward("", _resp("", "360"), **kw) == 0.0


def _write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


GOOD_GSM = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
GOOD_MBPP = json.dumps({"text": "t", "code": "def f(x): return x",
                        "test_list": ["assert f(1) == 1"]})


@pytest.mark.parametrize("fmt,lines,message", [
    ("gsm8k", [GOOD_GSM, "{not json"], r":2: invalid JSON"),
    ("gsm8k", [GOOD_GSM, GOOD_GSM, "[1, 2]"], r":3: expected a JSON object"),
    ("gsm8k", [json.dumps({"question": "q"})], r":1: missing field 'answer'"),
    ("gsm8k", [json.dumps({"question": "q", "answer": 5})], r":1: field 'answer' must be str"),
    ("gsm8k", [json.dumps({"question": "q", "answer": "no final"})], r":1: .*####"),
    ("math", [json.dumps({"problem": "p", "solution": "x = \\boxed{3"})], r":1: .*boxed"),
    ("mbpp", [GOOD_MBPP, json.dumps({"text": "t", "code": "c",
                                     "test_list": ["assert f(1) in (1, 2)"]})],
     r":2: unsupported test"),
    ("mbpp", [json.dumps({"text": "t", "code": "c", "test_list": ["assert f(x) == 1"]})],
     r":1: .*must be literals"),
    ("mbpp", [json.dumps({"text": "t", "code": "c", "test_list": []})], r":1: .*non-empty"),
    ("mbpp", [json.dumps({"text": "t", "code": "c", "test_list": ["assert f(1) == 1"],
                          "test_setup_code": "import x"})], r":1: .*test_setup_code"),
    ("gsm8k", ["", "  "], r": no records"),
])
def test_jsonl_bad_data_names_file_and_line(tmp_path, fmt, lines, message):
  path = _write(tmp_path, lines)
  with pytest.raises(ValueError, match=re.escape(path) + message):
    base.get_task(fmt, train_path=path)


def test_jsonl_missing_file_and_lenient_mode(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    base.get_task("gsm8k", train_path=str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="train_path and/or test_path"):
    base.get_task("gsm8k")
  bad = json.dumps({"question": "q", "answer": "no final"})
  path = _write(tmp_path, [GOOD_GSM, bad, GOOD_GSM])
  assert len(base.get_task("gsm8k", train_path=path, strict=False).examples("train")) == 2
  with pytest.raises(ValueError, match="invalid JSON"):   # broken JSON is never skipped
    base.get_task("gsm8k", train_path=_write(tmp_path, [GOOD_GSM, "{"], "b.jsonl"), strict=False)


MBPP_THREE = {"text": "Write a function to add one.", "code": "def inc(x):\n  return x + 1",
              "test_list": ["assert inc(1) == 2", "assert inc(5) == 6", "assert inc(-3) == -2"]}


def _lookup_table_solution(question: str) -> str:
  """Code that answers exactly the asserts shown in the prompt, from a table."""
  table = {}
  for line in question.splitlines():
    if line.startswith("assert "):
      test = jsonl.assert_to_test(line, "prompt")
      table[tuple(test["args"])] = test["expected"]
  return f"def inc(*args):\n  return {table!r}[args]"


@pytest.mark.skipif(__import__("shutil").which("bwrap") is None, reason="needs bubblewrap")
def test_mbpp_reward_is_not_earned_by_a_table_of_the_shown_asserts(tmp_path):
  task = base.get_task("mbpp", train_path=_write(tmp_path, [json.dumps(MBPP_THREE)]))
  ex = task.examples("train")[0]
  assert "assert inc(1) == 2" in ex.question
  assert "inc(5)" not in ex.question and "inc(-3)" not in ex.question
  assert len(ex.fields["tests"]) == 3  # the shown assert is one of the rewarded tests
  table = _lookup_table_solution(ex.question)
  assert table.count("): ") == 1
  assert task.reward("", _resp("", code_task.code_block(table)), **ex.reward_kwargs()) == 0.0
  assert task.reward("", ex.trace, **ex.reward_kwargs()) == 1.0


def test_mbpp_prompt_always_holds_a_test_back(tmp_path):
  one = dict(MBPP_THREE, test_list=["assert inc(1) == 2"])
  with_challenge = dict(one, challenge_test_list=["assert inc(9) == 10"])
  path = _write(tmp_path, [json.dumps(r) for r in (MBPP_THREE, one, with_challenge)])
  for num_shown, shown in ((0, [0, 0, 0]), (1, [1, 0, 1]), (5, [2, 0, 1])):
    examples = base.get_task("mbpp", train_path=path, num_shown=num_shown).examples("train")
    assert [ex.question.count("assert ") for ex in examples] == shown, num_shown
    assert [len(ex.fields["tests"]) for ex in examples] == [3, 1, 2]
  lone = base.get_task("mbpp", train_path=path).examples("train")[1]
  assert lone.question.endswith("define a function inc taking 1 argument.")
  assert "inc(9)" not in base.get_task("mbpp", train_path=path).examples("train")[2].question
  with pytest.raises(ValueError, match="num_shown"):
    base.get_task("mbpp", train_path=path, num_shown=-1)


def test_assert_to_test_hand_checked():
  assert jsonl.assert_to_test("assert g(1, 'a', [2]) == {'k': (3,)}", "u") == {
      "fn": "g", "args": [1, "a", [2]], "expected": {"k": (3,)}}
  for bad in ["assert g(1) != 2", "assert g(x=1) == 2", "assert g(*a) == 2", "g(1) == 2",
              "assert g(1) == 2 == 2", "assert m.g(1) == 2", "assert g(1) == 2; import os"]:
    with pytest.raises(ValueError, match="^u: "):
      jsonl.assert_to_test(bad, "u")


# ----------------------------------------------------------------------------- TFDS

def test_tfds_builder_round_trip_without_tensorflow(tmp_path):
  tfds_source = pytest.importorskip(
      "r1jax.tasks.tfds_source", reason="needs the [tfds] extra (tensorflow-datasets)")
  files = {"train": os.path.join(FIXTURES, "mbpp_tiny.jsonl")}
  data_dir = str(tmp_path / "tfds")
  sources = tfds_source.prepare_jsonl("tiny_mbpp", "mbpp", files, data_dir)
  assert len(sources["train"]) == 2
  want = base.get_task("mbpp", train_path=files["train"]).examples("train")
  got = tfds_source.from_tfds("r1jax_jsonl/tiny_mbpp", "train", data_dir=data_dir)
  assert [got[i] for i in range(len(got))] == want      # tuples survive storage
  task = base.get_task("tfds", dataset="r1jax_jsonl/tiny_mbpp", splits={"train": "train"},
                       data_dir=data_dir)
  assert task.reward_kind == "code" and task.examples("train") == want
  # Prepared again from the same file: reused. From another file: refused.
  tfds_source.prepare_jsonl("tiny_mbpp", "mbpp", files, data_dir)
  other = {"train": os.path.join(FIXTURES, "gsm8k_tiny.jsonl")}
  with pytest.raises(ValueError, match="prepared from other files"):
    tfds_source.prepare_jsonl("tiny_mbpp", "gsm8k", other, data_dir)
  # Any TFDS dataset by name, with a field map; a wrong map fails at start-up.
  renamed = tfds_source.from_tfds("r1jax_jsonl/tiny_mbpp", "train",
                                  {"question": "question", "answer": "uid"}, data_dir=data_dir)
  assert renamed[0].answer == want[0].uid
  with pytest.raises(ValueError, match="no feature"):
    tfds_source.from_tfds("r1jax_jsonl/tiny_mbpp", "train",
                          {"question": "problem", "answer": "answer"}, data_dir=data_dir)


def test_tfds_builder_stops_on_bad_data(tmp_path):
  tfds_source = pytest.importorskip(
      "r1jax.tasks.tfds_source", reason="needs the [tfds] extra (tensorflow-datasets)")
  path = _write(tmp_path, [GOOD_GSM, "{oops"])
  with pytest.raises(ValueError, match=re.escape(path) + ":2: invalid JSON"):
    tfds_source.prepare_jsonl("bad", "gsm8k", {"train": path}, str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="a-z0-9_"):
    tfds_source.prepare_jsonl("Bad-Name", "gsm8k", {"train": path}, str(tmp_path / "tfds"))


def test_code_rewards_run_the_sandbox():
  t = base.get_task("code")
  ex = t.examples("train", 1)[0]
  assert t.reward("", ex.trace, **ex.reward_kwargs()) == 1.0
  assert t.is_correct(ex.trace, **ex.reward_kwargs())
  wrong = _resp("guess", "```python\ndef f(*args):\n  return None\n```")
  assert t.reward("", wrong, **ex.reward_kwargs()) == 0.0
  tests = [{"fn": "f", "args": [1], "expected": 2}, {"fn": "f", "args": [2], "expected": 5}]
  half = _resp("", "```python\ndef f(x):\n  return 2 * x\n```")
  assert t.reward("", half, tests=tests) == 0.0
  assert base.get_task("code", partial_credit=True).reward("", half, tests=tests) == 0.5
  assert not t.is_correct(half, tests=tests)
  m = base.get_task("mbpp", train_path=os.path.join(FIXTURES, "mbpp_tiny.jsonl"))
  assert [m.reward("", e.trace, **e.reward_kwargs()) for e in m.examples("train")] == [1.0, 1.0]


def test_arithmetic_trace_slip_changes_only_traces_of_final_carry_sums():
  from r1jax import tasks
  clean = tasks.get_task("arithmetic", train_digits=(3, 3))
  slip = tasks.get_task("arithmetic", train_digits=(3, 3), trace_slip_rate=0.7)
  ex_clean, ex_slip = clean.examples("train", 300), slip.examples("train", 300)
  slipped = 0
  for a, b in zip(ex_clean, ex_slip):
    assert (a.question, a.answer) == (b.question, b.answer)   # same problems and gold answers
    assert clean.reward("", a.trace, **a.reward_kwargs()) == 1.0
    if b.trace != a.trace:
      slipped += 1
      assert len(b.answer) == 4                                # only sums with a final carry
      assert b.trace == a.trace.replace(f"<answer>{a.answer}<", f"<answer>{a.answer[1:]}<")
      assert slip.reward("", b.trace, **b.reward_kwargs()) == 0.0
  carries = sum(len(e.answer) == 4 for e in ex_clean)
  assert 0.55 < slipped / carries < 0.85, (slipped, carries)
  with pytest.raises(ValueError, match="trace_slip_rate"):
    tasks.get_task("arithmetic", trace_slip_rate=1.5)
