"""Open associations hold back the series they delivered to, until they end (by event or otherwise)."""

from __future__ import annotations

from medseg.pacs.associations import OpenAssociations


class FakeAssociation:
    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive


def test_a_series_is_busy_while_any_association_that_delivered_to_it_is_open() -> None:
    open_ = OpenAssociations()
    first, second = FakeAssociation(), FakeAssociation()
    open_.delivered(first, "1.1")
    open_.delivered(first, "1.2")
    open_.delivered(second, "1.1")
    assert open_.busy() == {"1.1", "1.2"}
    assert open_.closed(first) == {"1.1", "1.2"}
    assert open_.busy() == {"1.1"}  # the second association still delivers to 1.1
    assert open_.closed(first) == set()  # a second close event changes nothing
    assert open_.closed(second) == {"1.1"}
    assert open_.busy() == set() and open_.count() == 0


def test_an_association_whose_thread_ended_without_event_is_pruned() -> None:
    """A peer that drops the connection, or an event that never came: the association's thread is gone."""
    open_ = OpenAssociations()
    dropped, alive = FakeAssociation(), FakeAssociation()
    open_.delivered(dropped, "1.1")
    open_.delivered(alive, "1.2")
    assert open_.prune() == set()
    dropped.alive = False
    assert open_.prune() == {"1.1"}
    assert open_.busy() == {"1.2"}
