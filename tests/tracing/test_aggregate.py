import numpy as np

from explorer.tracing.aggregate import CATEGORIES, category_rows, mean_ci


def test_categories_follow_the_paper():
    scores = np.arange(10 * 2, dtype=float).reshape(10, 2)  # 10 tokens, 2 layers; row t holds 2t, 2t+1
    rows = category_rows(scores, (2, 6))  # subject tokens 2..5, last token 9
    assert set(rows) == set(CATEGORIES)
    assert rows["first_subject_token"].tolist() == [4, 5]
    assert rows["middle_subject_tokens"].tolist() == [7, 8]  # tokens 3 and 4
    assert rows["last_subject_token"].tolist() == [10, 11]
    assert rows["first_subsequent_token"].tolist() == [12, 13]
    assert rows["further_tokens"].tolist() == [15, 16]  # tokens 7 and 8
    assert rows["last_token"].tolist() == [18, 19]


def test_short_subjects_and_prompts_leave_empty_categories_out():
    scores = np.ones((4, 3))
    rows = category_rows(scores, (1, 3))  # two subject tokens, then the last token
    assert "middle_subject_tokens" not in rows and "further_tokens" not in rows
    assert "first_subsequent_token" not in rows  # token 3 is the last token


def test_mean_and_confidence_interval():
    summary = mean_ci([np.array([1.0, 2.0]), np.array([3.0, 2.0])])
    assert summary["mean"] == [2.0, 2.0] and summary["count"] == 2
    assert np.isclose(summary["ci95"][0], 1.96 * np.std([1, 3], ddof=1) / np.sqrt(2)) and summary["ci95"][1] == 0
    assert mean_ci([]) == {"mean": [], "ci95": [], "count": 0}
