"""The divergence policy's counting: skipped steps in a row, stop vs rollback, rollback budget."""

from msa_train.trainer.divergence import DivergencePolicy


def test_in_a_row_counting_resets_on_a_good_step():
    p = DivergencePolicy(max_skipped_steps=3, rollback=False, max_rollbacks=0)
    assert [p.record(s) for s in (True, True, False, True, True)] == ["ok"] * 5
    assert p.total_skipped == 4 and p.in_a_row == 2
    assert p.record(True) == "stop"


def test_rollback_until_the_budget_is_spent():
    p = DivergencePolicy(max_skipped_steps=1, rollback=True, max_rollbacks=2)
    assert p.record(True) == "rollback"
    p.rolled_back()
    assert p.record(False) == "ok" and p.record(True) == "rollback"
    p.rolled_back()
    assert p.record(True) == "stop" and p.rollbacks == 2
