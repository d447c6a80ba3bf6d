"""Review statuses: what a blinded second reader may see, disputes, adjudication."""

from __future__ import annotations

from workbench.db.store import Review
from workbench.review.reviews import _Reads, review_status


def test_a_blinded_reader_never_sees_a_colleagues_assessment() -> None:
    def read(who: str, agree: bool, label: str, kind: str = "read") -> Review:
        return Review(reviewer=who, agree=agree, label=label, kind=kind)

    first = _Reads({"a": read("a", False, "effusion")})
    assert review_status(first) == "disagreed"
    assert review_status(first, viewer="b") == "read_by_other"
    assert review_status(first, viewer="a") == "disagreed"
    both = _Reads({"a": read("a", False, "effusion"), "b": read("b", True, "normal")})
    assert review_status(both) == "disputed"
    assert review_status(both, viewer="b") == "agreed"  # their own read only
    settled = _Reads(both.reads, adjudication=read("admin", True, "normal", "adjudication"))
    assert review_status(settled) == "agreed"
    assert review_status(settled, viewer="c") == "read_by_other"
    assert review_status(None) == review_status(_Reads({})) == "unreviewed"
