"""The slot-time split of `cxr run` (orchestrator.cluster.timeline): segments between a run's
stamped moments, attempts counted from their launch, the idle slot time, the printed shares."""

import re

from orchestrator.cluster.timeline import LAUNCHED, SEGMENTS, slot_time, split_lines


def attempt(start: float, *gaps: float) -> list[tuple[str, float]]:
    """One attempt's moments: launched at `start`, then each of SEGMENTS' moments `gaps` later."""
    moments, at = [(LAUNCHED, start)], start
    for moment, gap in zip(SEGMENTS, gaps, strict=False):
        at += gap
        moments.append((moment, at))
    return moments


def test_segments_add_up_to_each_trials_time_and_the_rest_of_the_slots_is_idle():
    stamps = {
        "fold1-xception": attempt(10.0, 1, 2, 3, 0.5, 40, 1.5),  # 48 s
        "fold1-resnet50v2": attempt(12.0, 1, 2, 3, 0.5, 50, 1.5),
    }  # 58 s
    slot = slot_time(stamps, slots=2, wall=80.0)
    assert slot.held == 160.0 and slot.in_trials == 106.0 and slot.idle == 54.0
    assert slot.segments[SEGMENTS["trained"]] == 90.0 and slot.segments[SEGMENTS["imported"]] == 6.0
    assert slot.runs == ("fold1-xception", "fold1-resnet50v2")


def test_a_restarted_run_counts_both_attempts_but_not_the_wait_between_them():
    failed = attempt(0.0, 1, 2, 3, 0.5)  # killed while training: no "trained" stamp
    failed.append(("ended", 30.0))  # Tune's callback: the attempt ended (on_trial_recover)
    stamps = {"fold2-concatenated": failed + attempt(100.0, 1, 1, 1, 1, 20, 1)}
    slot = slot_time(stamps, slots=1, wall=130.0)
    # first attempt 30 s (its training cut off counts as teardown), second 25 s; 70 s of waiting
    # idle
    assert slot.in_trials == 55.0 and slot.idle == 75.0
    assert slot.segments[SEGMENTS["ended"]] == 30.0 - 6.5 + 1


def test_the_printed_split_names_its_parts_and_what_the_trainers_timers_miss():
    slot = slot_time({"fold1-xception": attempt(0.0, 2, 3, 5, 1, 80, 9)}, slots=1, wall=100.0)
    timers = {"steps": 50.0, "tracing": 20.0, "batchnorm": 5.0}  # 75 of the trainer's 80 s
    (line,) = split_lines(slot, timers)
    assert line.startswith(
        "slot time of the runs: 100 s (1 at a time x 100 s); accounted 95%: steps 50 s (50%)"
    )
    assert "teardown (Train, Tune) 9 s (9%)" in line and "TensorFlow import 5 s (5%)" in line
    assert re.search(r"not timed inside the trainer 5 s \(5%\)$", line)
    assert split_lines(slot_time({}, slots=2, wall=0.0), timers) == []
