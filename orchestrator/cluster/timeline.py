"""Where the runs' slot time goes outside the trainer's own timers (the split `cxr run` prints).

The trainer times its parts (training steps, the first step's trace, batch-norm statistics,
validation, MLflow, ...) into each run's timing.json. What a run costs before and after them is
process work that the trainer cannot see: Tune launching the trial, Ray Train setting up its
worker group, importing TensorFlow, tearing down. Each run's processes stamp the moments below
on the `Progress` actor (wall clock: one machine's, or NTP-close nodes'), and the driver's Tune
callback stamps the trial's launch and end. The segments between consecutive stamps add up to
the trial's whole time, and the slots' time no trial held is the scheduling gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The moments of one attempt at a run, in order; each names the segment that ends at it.
LAUNCHED = "launched"  # the driver's Tune callback: the trial starts (the segment's start)
SEGMENTS = {
    "trial": "trial start (Tune actor, its imports)",  # drive_one_run's first line
    "worker": "Train set-up (controller, worker)",  # _train_worker's first line
    "imported": "TensorFlow import",
    "trainer": "worker set-up (config, devices)",  # train_and_evaluate called
    "trained": "trainer",  # train_and_evaluate returned: its parts are the run's timing.json
    "ended": "teardown (Train, Tune)",  # the driver's Tune callback: the trial ended
}
TRAINER = "trained"  # the moment that ends the trainer's segment
ENDED = "ended"


@dataclass
class SlotTime:
    """The training stage's slot time: `slots` runs at once for `wall` seconds, split into the
    segments of every attempt (`segments`, summed over runs) and the time no trial held."""

    slots: int
    wall: float
    segments: dict[str, float] = field(default_factory=dict)
    runs: tuple[str, ...] = ()  # the runs launched

    @property
    def held(self) -> float:
        return self.slots * self.wall

    @property
    def in_trials(self) -> float:
        return sum(self.segments.values())

    @property
    def idle(self) -> float:
        """Slot time with no trial on it: Tune's start, the gaps between trials, the last runs'
        tail."""
        return max(0.0, self.held - self.in_trials)


def slot_time(stamps: dict[str, list[tuple[str, float]]], slots: int, wall: float) -> SlotTime:
    """`stamps`: per run, its (moment, wall-clock time) pairs in the order they were stamped.
    A segment is counted from the moment before it within one attempt; an attempt starts at
    LAUNCHED, and what came before it (a failed attempt's end, a wait) is not a segment."""
    segments = {name: 0.0 for name in SEGMENTS.values()}
    for events in stamps.values():
        previous = None
        for moment, at in sorted(events, key=lambda e: e[1]):
            if moment == LAUNCHED:
                previous = at
                continue
            if previous is None or moment not in SEGMENTS:
                continue
            segments[SEGMENTS[moment]] += max(0.0, at - previous)
            previous = at
    return SlotTime(slots, wall, segments, tuple(stamps))


def split_lines(slot: SlotTime, in_runs: dict[str, float]) -> list[str]:
    """The printed split: the slot time held, the trainer's own parts (`in_runs`, seconds summed
    over the runs' timing.json), the segments around it, the idle slot time, and what is left
    unaccounted (the trainer's time its timers do not cover)."""
    held = slot.held
    if held <= 0:
        return []
    trainer = slot.segments.get(SEGMENTS[TRAINER], 0.0)
    timed = sum(in_runs.values())
    untimed = max(0.0, trainer - timed)
    around = {k: v for k, v in slot.segments.items() if k != SEGMENTS[TRAINER]}
    parts = {**in_runs, **around, "idle slots (Tune start, gaps, tail)": slot.idle}
    accounted = sum(parts.values())

    def share(seconds: float) -> str:
        return f"{seconds:.0f} s ({100 * seconds / held:.0f}%)"

    ranked = ", ".join(
        f"{k} {share(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.5
    )
    return [
        f"slot time of the runs: {held:.0f} s ({slot.slots} at a time x {slot.wall:.0f} s); "
        f"accounted {100 * min(accounted, held) / held:.0f}%: {ranked}; "
        f"not timed inside the trainer {share(untimed)}"
    ]
