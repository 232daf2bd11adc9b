"""Answer extraction and strict equivalence: a table of verdicts, hedges, approximations, DoS."""
from __future__ import annotations

import time

import pytest

from r1jax.verify import math as m

# (gold, answer, expected verdict). Verdicts are decided by hand from the grading policy in the
# r1jax.verify.math docstring: exact value, one candidate, no approximations.
TABLE = [
    # integers, signs, spacing
    ('2', '2', True), ('2', '3', False), ('-2', '-2', True), ('-2', '2', False), ('0', '0', True),
    ('0', '-0', True), ('+5', '5', True), ('10', ' 10 ', True), ('10', '010', True),
    ('7', '7.', True), ('12', 'twelve', False),
    # decimals
    ('0.5', '0.5', True), ('0.5', '.5', True), ('0.5', '0.50', True), ('2.5', '2.50', True),
    ('18', '18.0', True), ('18', '18.00', True), ('3.14', '3.14', True), ('3.14', '3.141', False),
    ('0.1', '0.10000001', False), ('1.5', '1.05', False),
    # fractions
    ('\\frac{1}{2}', '1/2', True), ('\\frac{1}{2}', '0.5', True), ('\\frac{1}{2}', '\\dfrac{1}{2}', True),
    ('\\frac{1}{2}', '\\tfrac{1}{2}', True), ('\\frac12', '\\frac{1}{2}', True),
    ('\\frac{2}{4}', '\\frac{1}{2}', True), ('\\frac{3}{4}', '0.75', True), ('-\\frac{3}{4}', '-0.75', True),
    ('\\frac{3}{4}', '-0.75', False), ('\\frac{7}{2}', '3.5', True), ('3.5', '7/2', True),
    ('\\frac{1}{3}', '0.33', False), ('\\frac{1}{3}', '0.333', False), ('\\frac{1}{3}', '0.3333333333', False),
    ('\\frac{2}{3}', '0.67', False), ('\\frac{1}{3}', '1/3', True), ('\\frac{1}{3}', '2/6', True),
    ('\\frac{1}{3}', '\\frac{1}{4}', False), ('\\frac{10}{4}', '\\frac{5}{2}', True),
    ('\\frac{1}{0}', '1/0', True), ('\\frac{a}{b}', '\\frac{a}{b}', True),
    # thousands separators
    ('1000', '1,000', True), ('1000000', '1,000,000', True), ('1000', '1{,}000', True),
    ('1000', '1\\,000', True), ('1234.5', '1,234.5', True), ('1000', '1,00', False),
    # percentages and units
    ('50', '50\\%', True), ('50\\%', '50', True), ('50\\%', '50\\%', True), ('0.5', '50\\%', False),
    ('5', '5 \\text{ cm}', True), ('5', '5\\text{cm}', True), ('12', '12 \\mbox{ inches}', True),
    ('5', '6 \\text{ cm}', False), ('30', '30^\\circ', True), ('30', '30^{\\circ}', True),
    ('30^\\circ', '30', True), ('45', '45°', True), ('\\$5', '5', True), ('\\$5', '6', False),
    # LaTeX wrappers
    ('3', '$3$', True), ('3', '\\(3\\)', True), ('3', '\\[3\\]', True), ('3', '\\displaystyle 3', True),
    ('3', '\\text{3}', True), ('3', '\\textbf{3}', True), ('\\text{Monday}', 'Monday', True),
    ('\\text{Monday}', 'Tuesday', False),
    # radicals, pi, powers
    ('\\sqrt{2}', '\\sqrt{2}', True), ('\\sqrt{2}', '\\sqrt2', True), ('\\sqrt{2}', '1.414', False),
    ('\\sqrt{2}', '1.41421356237', False), ('2\\sqrt{3}', '\\sqrt{12}', True),
    ('\\frac{\\sqrt{2}}{2}', '\\frac{1}{\\sqrt{2}}', True), ('\\sqrt{2}/2', '\\frac{1}{\\sqrt2}', True),
    ('\\sqrt{8}', '2\\sqrt{2}', True), ('\\sqrt{8}', '3\\sqrt{2}', False), ('\\pi', '\\pi', True),
    ('\\pi', '3.14159', False), ('\\pi', '3.14', False), ('2\\pi', '\\pi \\cdot 2', True),
    ('\\frac{\\pi}{4}', '\\pi/4', True), ('\\frac{\\pi}{4}', '\\frac{\\pi}{3}', False),
    ('2^{10}', '1024', True), ('2^{10}', '1000', False), ('10^{3}', '1000', True),
    ('3^2', '9', True), ('e^{2}', 'e^2', True), ('\\sqrt[3]{8}', '2', True),
    ('\\left(\\frac{1}{2}\\right)^2', '\\frac14', True),
    # expressions
    ('x^2+2x+1', '(x+1)^2', True), ('x^2+2x+1', '(x-1)^2', False), ('x^2 + 1', '1 + x^2', True),
    ('2x', 'x \\cdot 2', True), ('2x', '2 \\times x', True), ('2x', 'x+x', True), ('2x', '3x', False),
    ('\\frac{x}{2}', '0.5x', True), ('(a+b)^2', 'a^2+2ab+b^2', True), ('a-b', 'b-a', False),
    ('\\pi r^2', 'r^2\\pi', True), ('\\sin^2 x + \\cos^2 x', '1', True),
    ('\\frac{x^2-1}{x-1}', 'x+1', True), ('3x+2', '3x+2.0', True), ('x^3', 'x^2', False),
    # equations
    ('3', 'x = 3', True), ('3', 'x=3', True), ('3', 'x = 4', False), ('x = 3', '3', True),
    ('x = 3', 'x = 3', True), ('y = 2x + 1', 'y = 1 + 2x', True), ('y = 2x + 1', 'y = 2x - 1', False),
    ('5', 'n = 5', True),
    # tuples, intervals, sets
    ('(1, 2)', '(1,2)', True), ('(1, 2)', '(2, 1)', False), ('(1, 2)', '(1, 2, 3)', False),
    ('(1, 2)', '\\left(1, 2\\right)', True), ('(\\frac12, 3)', '(0.5, 3)', True),
    ('[1, 2)', '[1, 2)', True), ('[1, 2)', '[1, 2]', False), ('[1, 2)', '(1, 2)', False),
    ('(-\\infty, 3]', '(-\\infty, 3]', True), ('(-\\infty, 3]', '(-\\infty, 3)', False),
    ('\\{1, 2\\}', '\\{2, 1\\}', True), ('\\{1, 2\\}', '\\{1, 3\\}', False), ('\\{1, 2\\}', '\\{1, 2, 3\\}', False),
    ('[2, 5]', '[2, 5]', True),
    # matrices
    ('\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', True),
    ('\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', '\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}', True),
    ('\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', '\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}', False),
    ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix}1&2\\end{pmatrix}', False),
    ('\\begin{pmatrix}\\frac12&0\\\\0&1\\end{pmatrix}', '\\begin{pmatrix}0.5&0\\\\0&1\\end{pmatrix}', True),
    # multiple choice
    ('B', 'B', True), ('B', '(B)', True), ('B', 'b', True), ('B', '\\text{B}', True), ('B', 'B)', True),
    ('B', '\\textbf{(B)}', True), ('B', 'C', False), ('B', 'B or C', False), ('B', 'B, C', False),
    ('B', 'AB', False), ('(C)', 'C', True), ('B', '(B) 42', True), ('B', 'Option B', True),
    # hedges: several candidates for one gold
    ('2', '2 or 3', False), ('2', '3 or 2', False), ('2', '2, 3', False), ('2', '\\{2, 3\\}', False),
    ('2', '2 \\text{ or } 3', False), ('2', '2 \\lor 3', False), ('2', '(2, 3)', False),
    ('x = 2', 'x = 2 or x = 3', False), ('2', '2 and/or 3', False),
    # empty / missing
    ('2', '', False), ('2', ' ', False), ('2', '$$', False), ('2', None, False), ('2', '\\text{}', False),
    # DoS expressions
    ('2', '9^{9^{9}}', False), ('2', '10^{10^{10}}', False), ('2', '(10^{100})!', False),
    ('2', '2^{2^{2^{2^{2^{2}}}}}', False), ('2', '9^{9^{9^{9}}}', False),
    # matrices and cases: a row break '\\\\' followed by a space is still a row break
    ('\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}', '\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}', False),
    ('\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}', '\\begin{pmatrix}1\\\\2\\end{pmatrix}', True),
    ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}', True),
    ('\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}', '\\begin{bmatrix} 3 & 4 \\\\ 1 & 2 \\end{bmatrix}', False),
    ('\\begin{cases} 1 \\\\ 2 \\end{cases}', '\\begin{cases} 2 \\\\ 1 \\end{cases}', False),
    ('\\leftarrow', 'arrow', False), ('\\rightarrow', 'arrow', False),  # control words stay whole
    # multiple-choice hedges
    ('B', '(B) or (C)', False), ('B', '(B) (C) (D)', False), ('B', '(B) and (C)', False),
    ('B', '(B) C', False), ('B', '(B) \\frac{1}{2}', True), ('(B)', 'B or C', False),
    # mixed numbers
    ('\\frac{7}{2}', '3\\frac{1}{2}', True), ('3.5', '3\\frac12', True), ('7/2', '3 \\frac{1}{2}', True),
    ('3/2', '3\\frac{1}{2}', False), ('-\\frac{7}{2}', '-3\\frac{1}{2}', True), ('2\\frac{1}{3}', '\\frac{7}{3}', True),
    ('x^2\\frac{1}{2}', '\\frac{x^2}{2}', True),  # an exponent before \\frac is no whole number
    # scientific notation
    ('100', '1e2', True), ('1000', '1e3', True), ('1000', '1E3', True), ('0.005', '5e-3', True),
    ('1000', '1e4', False), ('1000', '10e2', True),
    # bare lists of solutions compare in any order; tuples keep their order
    ('1, 2, 3', '3, 2, 1', True), ('1, 2, 3', '\\{3, 1, 2\\}', True), ('1, 2, 3', '1, 2', False),
    ('1, 2, 3', '1, 2, 2', False), ('1, 1, 2', '1, 2, 2', False), ('-1, \\frac12', '0.5, -1', True),
    ('1, 2', 'x = 2, x = 1', True), ('(1, 2)', '(2, 1)', False),
    # words are text, not products of symbols
    ('yes', 'sey', False), ('yes', 'Yes', True), ('\\text{yes}', 'yes', True), ('no', 'on', False),
    ('even', 'neve', False), ('\\text{no solution}', 'No solution', True), ('yes', 'y', False),
]


def test_table_is_large():
  assert len(TABLE) >= 150
  assert sum(v for _, _, v in TABLE) > 50 and sum(not v for _, _, v in TABLE) > 50


@pytest.mark.parametrize('gold,answer,expected', TABLE, ids=[f'{i}' for i in range(len(TABLE))])
def test_equivalence_table(gold, answer, expected):
  assert m.is_equivalent(gold, answer, timeout_s=5.0) is expected, (gold, answer)


@pytest.mark.parametrize('answer', ['9^{9^{9}}', '10^{10^{10}}+1', '2^{2^{2^{2^{2^{2}}}}}-1',
                                    '(10^{100})!', '\\frac{9^{9^{9}}}{3}'])
def test_dos_answers_are_false_within_the_limit(answer):
  m.clear_cache()
  start = time.monotonic()
  assert m.is_equivalent('2', answer, timeout_s=1.0) is False
  assert time.monotonic() - start < 1.0 + 2.5


def test_hung_comparison_is_killed_at_the_deadline():
  m.clear_cache()
  gold = '\\sqrt{2}\\cdot' + '+'.join(f'\\sin(x^{k})^{k}' for k in range(1, 40))
  answer = '+'.join(f'\\cos(x^{k})^{k}' for k in range(1, 40))
  start = time.monotonic()
  verdict = m.is_equivalent(gold, answer, timeout_s=0.3)
  assert time.monotonic() - start < 0.3 + 1.5
  assert verdict is False
  assert m.is_equivalent('\\sqrt{8}', '2\\sqrt{2}') is True  # the guard came back


EXTRACTION = [
    ('The sum is \\boxed{42}.', '42'),
    ('first \\boxed{1} then the final \\boxed{1}', '1'),
    ('\\boxed{2} or maybe \\boxed{3}', None),
    ('nested \\boxed{\\frac{1}{\\sqrt{2}}} ok', '\\frac{1}{\\sqrt{2}}'),
    ('\\fbox{7}', '7'),
    ('\\boxed 5 is it', '5'),
    ('<think>try \\boxed{3}</think> <answer>\\boxed{4}</answer>', '4'),
    ('<think>hmm</think><answer> 12 </answer>', '12'),
    ('<think>hmm</think><answer>first</answer> <answer>second</answer>', 'second'),
    ('<think>draft \\boxed{9}</think> so the answer is 10', '10'),
    ('Natalia sold 48 clips.\n#### 72', '72'),
    ('#### 1,000\n', '1,000'),
    ('So the answer is $\\frac{3}{4}$.', '\\frac{3}{4}'),
    ('The final answer is: **17**', '17'),
    ('the answer is 3. Then more text? no the answer is 5.', '5'),
    ('no answer here', None),
    ('', None),
    ('\\boxed{}', None),
    ('\\boxed{unbalanced', None),
    ('\\boxed{\\boxed{5}}', '5'), ('\\boxed{ \\boxed{ \\boxed{5} } }', '5'),
    ('\\boxed{\\boxed{5}} and \\boxed{5}', '5'), ('\\boxed{\\boxed{5} + 1}', '\\boxed{5} + 1'),
    ('**Answer:** 5', '5'), ('**Answer**: 5', '5'), ('Final Answer: 7', '7'),
    ('Some work.\n### Final Answer: $12$.', '12'), ('the answer is 3\nAnswer: 4', '4'),
    ('<answer>a</answer> <answer>b', 'a'), ('<answer>\\boxed{1}</answer><answer>\\boxed{2}</answer>', '2'),
]


@pytest.mark.parametrize('text,expected', EXTRACTION)
def test_extract_answer(text, expected):
  assert m.extract_answer(text) == expected


def test_bad_input_raises():
  with pytest.raises(ValueError):
    m.extract_answer(None)
  with pytest.raises(ValueError):
    m.is_equivalent(2, '2')
  with pytest.raises(ValueError):
    m.is_equivalent('2', '2', timeout_s=0)


def test_end_to_end_hedged_completions_score_zero():
  for completion in ['\\boxed{2}\\boxed{3}', '<answer>2 or 3</answer>', 'the answer is 2, 3',
                     '<answer>\\boxed{3} \\boxed{2}</answer>']:
    assert not m.is_equivalent('2', m.extract_answer(completion)), completion


def test_the_length_limit_counts_the_answer_not_its_padding():
  assert m.is_equivalent('5', '5' + ' ' * 3000)
  assert m.is_equivalent('5', '\n' * 3000 + '5')
  assert not m.is_equivalent('5', '5' + '+0' * 1500)


ADVERSARIAL_TEXTS = {
    'open_boxes': lambda n: '\\boxed{' * (n // 7),
    'nested_boxes': lambda n: '\\boxed{' * (n // 8) + '}' * (n // 8),
    'many_boxes': lambda n: '\\boxed{1}' * (n // 9),
    'bare_boxes': lambda n: '\\boxed 5 ' * (n // 9),
    'newlines': lambda n: '\n' * n,
    'open_answer_tags': lambda n: '<answer>' * (n // 8),
    'answer_is': lambda n: 'the answer is ' * (n // 14),
    'trailing_dots': lambda n: 'the answer is 5' + '.' * n,
    'trailing_bold': lambda n: 'the answer is 5' + '**' * (n // 2),
    'dollars': lambda n: 'the answer is ' + '$' * n + 'x',
    'hash_line': lambda n: '#### 5' + ' ' * n + 'x',
    'labels': lambda n: '**Answer:** ' * (n // 12),
    'braces': lambda n: '{' * n,
}


@pytest.mark.parametrize('kind', sorted(ADVERSARIAL_TEXTS))
def test_extraction_is_linear_time(kind):
  """Four times the text takes about four times as long (a quadratic step: sixteen)."""
  make = ADVERSARIAL_TEXTS[kind]
  def cost(n):
    text = make(n)
    start = time.perf_counter()
    m.extract_answer(text)
    return time.perf_counter() - start
  small = min(cost(40_000) for _ in range(3))
  large = min(cost(160_000) for _ in range(3))
  assert large < 2.0, f'{kind}: {large:.2f}s for 160k characters'
  assert large < 10 * small + 0.05, f'{kind}: {small:.4f}s -> {large:.4f}s for 4x the text'


def test_bare_list_comparison_keeps_the_deadline():
  m.clear_cache()
  slow = '+'.join(f'\\sin(x^{k})^{k}' for k in range(1, 30))
  gold = ', '.join([slow] * 8)
  answer = ', '.join(['\\cos(x)'] * 8)
  start = time.monotonic()
  assert m.is_equivalent(gold, answer, timeout_s=0.5) is False
  assert time.monotonic() - start < 0.5 + 2.5
