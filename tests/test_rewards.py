"""Verifiable rewards (p3o_jax/rewards.py) against answers worked out by hand."""
import pytest

from p3o_jax import rewards


@pytest.mark.parametrize("text, number", [
    ("She has 36-10=<<36-10=26>>26 pencils.\n#### 26", 26.0),
    ("#### 1,050", 1050.0),
    ("The total is 12. Then 3 more, so 15.", 15.0),        # no mark: the last number
    ("#### 7\nbut later 9", 7.0),                          # the mark wins over later numbers
    ("It costs $-4.50 in the end.", -4.5),
    ("So the answer is .5", 0.5),
    ("no digits here", None),
])
def test_final_number(text, number):
  assert rewards.final_number(text) == number


def test_gsm8k_correct_scores_each_response_against_its_own_answer():
  answers = ["... #### 26", "#### 1,050", "#### 1,050", "#### 3", "#### 72"]
  responses = ["so 26.", "#### 1050", "It is 1,050 dollars", "I think 4", "72.0"]
  assert rewards.gsm8k_correct([""] * 5, responses, answers) == [1.0, 1.0, 1.0, 0.0, 1.0]
  with pytest.raises(ValueError, match="has no final number"):
    rewards.gsm8k_correct([""], ["1"], ["no number"])
