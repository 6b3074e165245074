"""The soft/hard migration rule (cluster/router/migration.challenge): a
challenger must beat the session's current group by `margin` on
consecutive checks; anything else resets the streak. Pure: no asyncio."""

from mlxmoe.cluster.router import Chat
from mlxmoe.cluster.router.migration import challenge


def session(group=0, expert_group=None) -> Chat:
    return Chat(id="s", scores={}, ranked=[], margin=0.0, group=group, expert_group=expert_group)


def test_streak_counts_consecutive_wins_of_one_challenger():
    s = session()
    assert challenge(s, {0: 0.3, 1: 0.5}, [1, 0], 0.1) == (1, 0.2) and s.streak == (1, 1)
    challenge(s, {0: 0.3, 1: 0.5}, [1, 0], 0.1)
    assert s.streak == (1, 2)
    challenge(s, {0: 0.3, 2: 0.5}, [2, 0], 0.1)
    assert s.streak == (2, 1)  # a different challenger starts over


def test_small_lead_or_current_best_resets():
    s = session()
    s.streak = (1, 1)
    challenge(s, {0: 0.45, 1: 0.5}, [1, 0], 0.1)
    assert s.streak == (None, 0)
    s.streak = (1, 1)
    challenge(s, {0: 0.6, 1: 0.5}, [0, 1], 0.1)
    assert s.streak == (None, 0)


def test_current_group_is_the_expert_group_after_a_soft_move():
    s = session(group=0, expert_group=1)
    best, lead = challenge(s, {0: 0.3, 1: 0.5}, [1, 0], 0.1)
    assert best == 1 and lead == 0.0 and s.streak == (None, 0)
