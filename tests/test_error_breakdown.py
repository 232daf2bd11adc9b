"""experiments/r1_tiny/error_breakdown.py: each held-out answer lands in the right bin."""
import importlib.util
import os

import pytest

from r1jax.tasks import arithmetic

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "r1_tiny", "error_breakdown.py")


@pytest.fixture(scope="module")
def classify():
  spec = importlib.util.spec_from_file_location("error_breakdown", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.classify


@pytest.mark.parametrize("answer_text,gold,expected", [
    ("1101", "1101", "correct_carry"),       # 552 + 549
    ("603", "603", "correct_no_carry"),
    ("101", "1101", "teacher_slip"),         # the leading carry dropped
    ("110", "1101", "other_wrong"),          # the last digit dropped instead
    ("03", "603", "other_wrong"),            # no final carry: never a slip
    (None, "1101", "malformed"),
])
def test_classify(classify, answer_text, gold, expected):
  task = arithmetic.ArithmeticTask(ops=("+",), test_digits=(3, 3))
  completion = ("<think>2+9+0=11</think>" if answer_text is None else
                f"<think>2+9+0=11</think><answer>{answer_text}</answer>")
  assert classify(completion, gold, task) == expected
