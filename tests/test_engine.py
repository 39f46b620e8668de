"""Golden timelines for tiny programs, in SimPy's style: exact start and end times."""

from dataclasses import replace

import numpy as np
import pytest

from moesim.sim.engine import Compute, Exchange, run_program
from tests.engine_reference import reference_run_program


def _log(program, rec):
    return [
        (op.name, dev, float(rec.start_us[i, dev]), float(rec.end_us[i, dev]))
        for i, op in enumerate(program)
        for dev in range(rec.start_us.shape[1])
    ]


def test_one_device_fixed_layer_time_gives_layers_times_time():
    layers, t = 7, 12.5
    program = [Compute(f"L{i}", "other", np.array([t]), layer=i) for i in range(layers)]
    rec = run_program(program, 1)
    assert rec.end_us.max() == layers * t
    assert _log(program, rec)[:2] == [("L0", 0, 0.0, 12.5), ("L1", 0, 12.5, 25.0)]


def test_exchange_waits_for_slowest_sender():
    everyone = np.ones((3, 3), dtype=bool)
    program = [
        Compute("work", "expert", np.array([1.0, 2.0, 4.0])),
        Exchange("a2a", "dispatch", np.array([0.5, 0.5, 0.5]), everyone),
        Compute("after", "other", np.array([1.0, 1.0, 1.0])),
    ]
    rec = run_program(program, 3)
    assert _log(program, rec) == [
        ("work", 0, 0.0, 1.0),
        ("work", 1, 0.0, 2.0),
        ("work", 2, 0.0, 4.0),
        ("a2a", 0, 4.0, 4.5),
        ("a2a", 1, 4.0, 4.5),
        ("a2a", 2, 4.0, 4.5),
        ("after", 0, 4.5, 5.5),
        ("after", 1, 4.5, 5.5),
        ("after", 2, 4.5, 5.5),
    ]
    assert rec.wait_us[1].tolist() == [3.0, 2.0, 0.0]


def test_exchange_only_waits_for_its_own_senders():
    # device 1 receives only from device 0; device 0 from nobody else
    senders = np.array([[False, True], [False, False]])
    program = [
        Compute("work", "expert", np.array([3.0, 1.0])),
        Exchange("a2a", "dispatch", np.array([1.0, 1.0]), senders),
    ]
    rec = run_program(program, 2)
    assert rec.start_us[1].tolist() == [3.0, 3.0]  # device 1 waited 2 us for device 0
    assert rec.wait_us[1].tolist() == [0.0, 2.0]


def test_slow_device_delays_every_device_at_next_exchange():
    d = 4
    everyone = np.ones((d, d), dtype=bool)
    per_layer = np.array([10.0, 10.0, 10.0, 20.0])  # device 3 twice as slow
    program = []
    for layer in range(2):
        program += [
            Compute(f"L{layer} experts", "expert", per_layer, layer),
            Exchange(f"L{layer} combine", "combine", np.full(d, 1.0), everyone, layer=layer),
        ]
    rec = run_program(program, d)
    # each layer ends at the slow device's pace: (20 + 1) per layer
    assert rec.end_us[-1].tolist() == [42.0] * d
    # the fast devices wait 10 us per layer
    assert rec.wait_us[1].tolist() == [10.0, 10.0, 10.0, 0.0]
    assert rec.wait_us[3].tolist() == [10.0, 10.0, 10.0, 0.0]


def test_dense_barrier_matches_per_device_dependencies():
    rng = np.random.default_rng(0)
    d = 6
    dense = np.ones((d, d), dtype=bool)
    almost = dense.copy()
    almost[0, 5] = False  # device 5 does not wait for device 0
    for senders in (dense, almost):
        program = []
        for layer in range(3):
            program += [
                Compute(f"c{layer}", "expert", rng.uniform(1, 5, d), layer),
                Exchange(f"x{layer}", "dispatch", rng.uniform(0.5, 1, d), senders, layer=layer),
            ]
        rec = run_program(program, d)
        # independent recomputation: each exchange starts at the latest ready time of the
        # device's senders (and itself)
        t = np.zeros(d)
        for op in program:
            if isinstance(op, Exchange):
                ready = t.copy()
                t = np.array(
                    [max(ready[s] for s in range(d) if senders[s, j] or s == j) for j in range(d)]
                )
            t = t + op.duration_us
        np.testing.assert_allclose(rec.end_us[-1], t, rtol=1e-12)


def test_two_microbatch_overlap_golden_timeline():
    # per microbatch: compute a=2, transfer x=3, compute e=1; one device
    one = np.ones((1, 1), dtype=bool)

    def c(name, t, after):
        return Compute(name, "other", np.array([t]), after=after)

    def x(name, t, after):
        return Exchange(name, "dispatch", np.array([t]), one, after=after)

    program = [
        c("C0", 2.0, ()),
        c("C1", 2.0, (0,)),
        x("X0", 3.0, (0,)),
        x("X1", 3.0, (1,)),
        c("E0", 1.0, (2,)),
        c("E1", 1.0, (3,)),
    ]
    rec = run_program(program, 1)
    assert _log(program, rec) == [
        ("C0", 0, 0.0, 2.0),
        ("C1", 0, 2.0, 4.0),  # compute stream
        ("X0", 0, 2.0, 5.0),
        ("X1", 0, 5.0, 8.0),  # transfers: X1 queues behind X0
        ("E0", 0, 5.0, 6.0),
        ("E1", 0, 8.0, 9.0),
    ]
    # run back to back the same work takes 2 * (2 + 3 + 1) = 12; overlap hides exactly the
    # second compute under the first transfer and the first expert under the second transfer
    assert rec.end_us.max() == 12.0 - 2.0 - 1.0


def test_overlap_waits_for_other_devices_per_microbatch():
    every = np.ones((2, 2), dtype=bool)
    program = [
        Compute("C0", "other", np.array([1.0, 4.0]), after=()),
        Compute("C1", "other", np.array([1.0, 1.0]), after=(0,)),
        Exchange("X0", "dispatch", np.array([1.0, 1.0]), every, after=(0,)),
        Exchange("X1", "dispatch", np.array([1.0, 1.0]), every, after=(1,)),
    ]
    rec = run_program(program, 2)
    # X0 waits for device 1's C0 (ends at 4) on both devices; device 0's C1 runs meanwhile
    assert rec.start_us[2].tolist() == [4.0, 4.0]
    assert rec.start_us[1].tolist() == [1.0, 4.0]
    assert rec.start_us[3].tolist() == [5.0, 5.0]


def _random_program(rng: np.random.Generator, d: int, streamed: bool) -> list:
    """Random computes and exchanges (dense, sparse and all-to-all senders); with
    ``streamed``, two interleaved microbatch chains on two streams, as overlap builds."""
    ops: list = []
    for i in range(24):
        dur = rng.exponential(3.0, d).round(3) * (rng.random(d) > 0.1)
        kind = rng.integers(4)
        if kind == 0:
            op = Compute(f"c{i}", "other", dur)
        else:
            senders = None if kind == 1 else rng.random((d, d)) < (0.3 if kind == 2 else 0.97)
            op = Exchange(f"x{i}", "dispatch", dur, senders, stream="comm")
        if streamed:
            op = replace(op, after=(i - 2,) if i >= 2 else (), stream=op.stream)
        ops.append(op)
    return ops


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_op_level_engine_equals_one_process_per_device(seed, streamed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 40))
    program = _random_program(rng, d, streamed)
    got, want = run_program(program, d), reference_run_program(program, d)
    np.testing.assert_array_equal(got.start_us, want.start_us)
    np.testing.assert_array_equal(got.wait_us, want.wait_us)
    np.testing.assert_array_equal(got.duration_us, want.duration_us)
