"""`step_aside` (admission invariant 5): the slot comes back at once and exactly once."""

from __future__ import annotations

import asyncio

import pytest

from tenfold.errors import Overloaded
from tenfold.limits.admission import AdmissionController, step_aside


class Recorder:
    """A fixed limit that records the samples it is fed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.samples: list[float] = []

    def on_sample(self, rtt_s: float, in_flight: int, *, dropped: bool = False) -> None:
        self.samples.append(rtt_s)


def test_a_request_that_steps_aside_frees_its_slot_and_feeds_no_sample() -> None:
    async def run() -> None:
        algorithm = Recorder(limit=1)
        admission = AdmissionController(algorithm, max_queue=0)
        async with admission.admit("anonymous"):
            with pytest.raises(Overloaded):  # the one slot is taken
                async with admission.admit("anonymous"):
                    pass
            step_aside()
            step_aside()  # twice is once
            assert admission.in_flight == 0
            async with admission.admit("anonymous"):  # another request gets the slot
                assert admission.in_flight == 1
            assert admission.in_flight == 0
        assert admission.in_flight == 0
        assert len(algorithm.samples) == 1  # only the request that kept its slot

    asyncio.run(run())


def test_stepping_aside_outside_a_request_does_nothing() -> None:
    step_aside()  # no admission in this context: a background task, admission off
