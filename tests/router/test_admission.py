"""Admission: each kind of work its own places, and asks that would miss their deadline refused at the door."""

import pytest

from fabric.errors import Overloaded
from router.admission import ASK, SEARCH, Admission, AskGate


def test_a_flood_of_one_kind_leaves_the_others_their_places():
    admission = Admission({ASK: 2, SEARCH: 3})
    with admission.admit(ASK), admission.admit(ASK):
        with pytest.raises(Overloaded, match="ask requests"):
            with admission.admit(ASK):
                pass
        with admission.admit(SEARCH):  # searches still get in
            assert admission.inflight == {ASK: 2, SEARCH: 1}
    assert admission.inflight == {ASK: 0, SEARCH: 0}


def test_the_gate_refuses_an_ask_that_would_finish_after_its_deadline():
    gate = AskGate(lambda: 1)
    gate.check(0.1)  # nothing measured yet: no estimate, no refusal
    gate.record(total_ms=3000, generate_ms=2500)  # 0.5 s before generating, 2.5 s generating
    assert gate.expected_s() == pytest.approx(3.0)
    gate.check(3.5)
    with gate.passing(), gate.passing():  # two ahead, served one at a time
        assert gate.expected_s() == pytest.approx(0.5 + 3 * 2.5)
        with pytest.raises(Overloaded) as info:
            gate.check(5.0)
        assert info.value.retry_after_s == pytest.approx(3.0) and "2 asks ahead" in info.value.message
        gate.check(9.0)
    assert gate.in_flight == 0


def test_more_generations_at_once_mean_a_shorter_wait():
    parallel = [1]
    gate = AskGate(lambda: parallel[0])
    gate.record(total_ms=2000, generate_ms=2000)
    with gate.passing(), gate.passing(), gate.passing():
        one_at_a_time = gate.expected_s()
        parallel[0] = 4
        assert gate.expected_s() == pytest.approx(2.0) and one_at_a_time == pytest.approx(8.0)
        parallel[0] = 0  # the generator does not say: no estimate
        assert gate.expected_s() is None


def test_a_burst_admitted_together_counts_itself():
    gate = AskGate(lambda: 1)
    gate.record(total_ms=1000, generate_ms=1000)
    passages = []
    with pytest.raises(Overloaded):
        for _ in range(10):  # 4 s of budget and 1 s each: a fifth in the same instant no longer fits
            passages.append(gate.admit(4.0))
    assert len(passages) == 4 and gate.in_flight == 4
    for passage in passages:
        passage.release()
        passage.release()  # once only
    assert gate.in_flight == 0
