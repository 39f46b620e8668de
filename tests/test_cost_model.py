"""The cost model: calibration recovers known factors; interpolation keeps measured points."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from moesim.costs.model import (
    CostModel,
    OpFactors,
    bandwidth,
    calibrate,
    cost_model_for,
    fit_memory_curve,
    fit_token_correction,
    gemm_width,
    op_elements,
    predict_us,
    profile_factors,
)
from moesim.costs.work import BenchShape, op_work, table_widths
from moesim.errors import InputError
from moesim.hardware import get_profile
from moesim.model.shapes import get_preset
from tests.conftest import REPO, round_h100

TRUE = OpFactors(
    launch_us=20.0,
    peak_flop_per_us=5e4,
    bytes_per_us=8e3,
    half_tokens=12.0,
    cache_bytes_per_us=3e4,
    cache_bytes=2e7,
    cache_sharpness=2.0,
)
TOKENS = [2**i for i in range(0, 14)]


def _shape(name: str) -> BenchShape:
    return BenchShape.from_model(get_preset(name), local_experts=2)


def _table(
    models: list[str], factors: OpFactors = TRUE, noise: float = 0.0, op: str = "expert_ffn_bmm"
) -> pd.DataFrame:
    """fp32 rows of ``op`` for the models' shapes, timed by ``factors`` (times log-normal
    ``noise``)."""
    rng = np.random.default_rng(0)
    rows = []
    for m in models:
        s = _shape(m)
        for t in TOKENS:
            fl, by, _ = op_work(op, s, t, "fp32")
            us = float(predict_us(factors, np.array([fl]), np.array([by]), np.array([t]))[0])
            us *= float(np.exp(rng.normal(0, noise))) if noise else 1.0
            rows.append(
                {
                    "op": op,
                    "dtype": "fp32",
                    "tokens": t,
                    **table_widths(op, s),
                    "flops": fl,
                    "bytes": by,
                    "median_us": us,
                    "model": m,
                }
            )
    return pd.DataFrame(rows)


def test_calibration_recovers_known_factors():
    table = _table(["FLAME-MoE-290M", "OLMoE-1B-7B", "Mixtral-8x7B"])
    fit = calibrate(table)
    pred = predict_us(fit, table["flops"], table["bytes"], table["tokens"])
    np.testing.assert_allclose(pred, table["median_us"], rtol=1e-3)
    assert fit.launch_us == pytest.approx(TRUE.launch_us, rel=0.05)
    assert fit.peak_flop_per_us == pytest.approx(TRUE.peak_flop_per_us, rel=0.05)
    assert fit.bytes_per_us == pytest.approx(TRUE.bytes_per_us, rel=0.05)


def test_cache_step_in_bandwidth():
    f = OpFactors(
        launch_us=0.0,
        peak_flop_per_us=1.0,
        bytes_per_us=10.0,
        cache_bytes_per_us=100.0,
        cache_bytes=1e6,
        cache_sharpness=8.0,
    )
    small, large = predict_us(f, np.zeros(2), np.array([1e4, 1e9]), np.ones(2))
    assert small == pytest.approx(1e4 / 100.0, rel=1e-3)  # in cache
    assert large == pytest.approx(1e9 / 10.0, rel=1e-3)  # from memory


def test_held_out_shape_predicted_from_the_others():
    train = _table(["FLAME-MoE-290M", "OLMoE-1B-7B"], noise=0.03)
    held = _table(["Mixtral-8x7B"])
    cm = CostModel.from_table(train)
    s = _shape("Mixtral-8x7B")
    pred = cm.time_us("expert_ffn_bmm", s, held["tokens"].to_numpy(), "fp32")
    err = np.abs(pred / held["median_us"].to_numpy() - 1)
    assert np.median(err) < 0.05 and err.max() < 0.15


def test_measured_shape_is_interpolated_monotonically():
    table = _table(["FLAME-MoE-290M"])
    table.loc[table["tokens"] == 64, "median_us"] *= 1.3  # a bump the roofline would not have
    cm = CostModel.from_table(table)
    s = _shape("FLAME-MoE-290M")
    at = cm.time_us("expert_ffn_bmm", s, np.array(TOKENS, dtype=float), "fp32")
    np.testing.assert_allclose(at, np.maximum.accumulate(table["median_us"].to_numpy()), rtol=1e-9)
    between = cm.time_us("expert_ffn_bmm", s, np.linspace(1, 8192, 500), "fp32")
    assert (np.diff(between) >= -1e-9).all()
    # beyond the table: the roofline's growth, pinned to the last measured point
    far = cm.time_us("expert_ffn_bmm", s, np.array([8192.0, 32768.0]), "fp32")
    assert far[1] > far[0] * 2
    assert cm.time_us("expert_ffn_bmm", s, np.array([0.0]), "fp32")[0] == 0.0


def test_without_table_uses_profile_roofline():
    hw = get_profile("H100-SXM")
    cm = CostModel(hw=hw)
    s = _shape("DeepSeek-V3")
    t = cm.time_us("expert_ffn_bmm", s, np.array([1.0, 4096.0]), "bf16")
    f = profile_factors(hw, "bf16")
    fl, by, _ = op_work("expert_ffn_bmm", s, 4096, "bf16")
    # the small-batch term, per GEMM: gate+up (2 experts x 4,096 wide, 2/3 of the FLOPs)
    # and down (2 x 7,168, 1/3): 244,000 x (2/3 / 8,192 + 1/3 / 14,336) = 25.530 rows,
    # the width 3 x 2 x 7,168 x 2,048 / (7,168 + 2,048) = 9,557.33 of op_output_width
    assert (hw.efficiency.gemm_half_outputs, s.local_experts, s.d_ff) == (244000, 2, 2048)
    half = 244000 * (2 / 3 / 8192 + 1 / 3 / 14336)
    assert half == pytest.approx(25.530, abs=1e-3)
    compute = fl * (4096 + half) / 4096 / f.peak_flop_per_us
    assert t[1] == pytest.approx(f.launch_us + (compute**4 + (by / f.bytes_per_us) ** 4) ** 0.25)
    # one token is bound by reading the expert weights
    _, by1, _ = op_work("expert_ffn_bmm", s, 1, "bf16")
    assert t[0] == pytest.approx(f.launch_us + by1 / f.bytes_per_us, rel=1e-3)


@pytest.mark.parametrize("op", ["router", "permute", "attention", "memcpy", "expert_ffn_grouped"])
def test_every_op_finds_its_measured_rows(op):
    """A shape is matched to its rows by the width columns the benchmark writes for that op
    (d_ff, top_k, heads are 0 where the op does not use them)."""
    s = BenchShape.from_model(get_preset("DeepSeek-V3"), local_experts=4)
    rows = []
    # listed out of order (the table need not be sorted); the dip at 4 tokens is measured
    for t, us in ((16, 300.0), (1, 50.0), (4, 40.0)):
        fl, by, _ = op_work(op, s, t, "fp32")
        rows.append(
            {"op": op, "dtype": "fp32", "tokens": t, "flops": fl, "bytes": by, "median_us": us}
            | table_widths(op, s)
        )
    cm = CostModel.from_table(pd.DataFrame(rows))
    at = cm.time_us(op, s, np.array([1.0, 4.0, 16.0]), "fp32")
    np.testing.assert_allclose(at, [50.0, 50.0, 300.0])  # measured, made monotone
    other = BenchShape.from_model(get_preset("OLMoE-1B-7B"), local_experts=4)
    assert cm._measured(op, other, "fp32") is None


def test_token_correction_hand_checked():
    """Two shapes at one token count, roofline 1 and e µs, measured 1 and e**2 µs:
    minimise (0 - a)**2 + (2 - a - b)**2 + 10 (b - 1)**2 -> b = 22/21, a = 10/21."""
    f = OpFactors(launch_us=0.0, peak_flop_per_us=1.0, bytes_per_us=1.0)
    rows = pd.DataFrame(
        {"flops": [0.0, 0.0], "bytes": [1.0, np.e], "tokens": [8, 8], "median_us": [1.0, np.e**2]}
    )
    c = fit_token_correction(rows, f, ridge=10.0)
    assert c.log_tokens == (pytest.approx(np.log(8)),)
    assert c.slope[0] == pytest.approx(22 / 21) and c.offset[0] == pytest.approx(10 / 21)
    # applied at any token count (held beyond the fitted one): exp(a + b log r)
    got = c.apply(np.array([1.0, 8.0, 100.0]), np.array([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(got, np.exp(10 / 21 + 22 / 21 * np.log(2.0)))


def test_token_correction_with_one_shape_reproduces_its_points():
    """One row per token count: slope 1, offset log(measured / roofline), so the corrected
    roofline meets every measured point and interpolates the ratio in log tokens."""
    f = OpFactors(launch_us=1.0, peak_flop_per_us=10.0, bytes_per_us=5.0)
    tok = np.array([1.0, 4.0, 16.0])
    fl, by = 100.0 * tok, 50.0 + tok
    meas = predict_us(f, fl, by, tok) * np.array([2.0, 1.0, 1.5])
    rows = pd.DataFrame({"flops": fl, "bytes": by, "tokens": tok, "median_us": meas})
    c = fit_token_correction(rows, f)
    np.testing.assert_allclose(c.slope, 1.0)
    np.testing.assert_allclose(c.apply(tok, predict_us(f, fl, by, tok)), meas)
    # halfway between 1 and 4 tokens in log: ratio sqrt(2 * 1)
    r2 = predict_us(f, np.array([200.0]), np.array([52.0]), np.array([2.0]))
    np.testing.assert_allclose(c.apply(np.array([2.0]), r2), r2 * np.sqrt(2.0))


def test_token_correction_carries_a_per_token_effect_to_a_held_out_shape():
    """Every shape runs 2x slower than its roofline at one token (a matrix-vector kernel):
    the smooth roofline cannot fit it, the token correction learns it from three shapes
    and predicts the fourth."""
    bump = {1: 2.0}

    def table(models: list[str]) -> pd.DataFrame:
        t = _table(models)
        t["median_us"] *= t["tokens"].map(lambda n: bump.get(n, 1.0))
        return t

    train = table(["FLAME-MoE-290M", "Mixtral-8x7B", "DeepSeek-V3"])
    held = table(["OLMoE-1B-7B"])
    cm = CostModel.from_table(train)
    s = _shape("OLMoE-1B-7B")
    pred = cm.roofline_us("expert_ffn_bmm", s, held["tokens"].to_numpy(float), "fp32")
    err = np.abs(pred / held["median_us"].to_numpy() - 1)
    assert err.max() < 0.1
    plain = CostModel(table=cm.table, factors=cm.factors)  # the same fit, no correction
    p1 = plain.roofline_us("expert_ffn_bmm", s, np.array([1.0]), "fp32")[0]
    assert abs(p1 / held["median_us"].iloc[0] - 1) > 0.3


def test_table_mixing_thread_counts_is_refused():
    table = _table(["FLAME-MoE-290M"])
    table["threads"] = [1] * 7 + [2] * (len(table) - 7)
    with pytest.raises(InputError, match="thread counts") as err:
        CostModel.from_table(table)
    assert err.value.field == "threads"


def test_calibrated_cache_is_never_slower_than_memory():
    """The smallest quarter 3x slower than the form gives (fixed costs it cannot carry):
    the fit must not turn the cache step upside down to fit them, which would make
    every small unseen shape slower than a large one."""
    table = _table(["FLAME-MoE-290M", "OLMoE-1B-7B", "Mixtral-8x7B"])
    small = table["bytes"] < table["bytes"].quantile(0.25)
    table.loc[small, "median_us"] *= 3.0
    fit = calibrate(table)
    assert fit.cache_bytes_per_us is not None
    assert fit.cache_bytes_per_us >= fit.bytes_per_us * (1 - 1e-9)


CURVE = OpFactors(
    launch_us=1.0,
    peak_flop_per_us=1.0,
    bytes_per_us=2e4,  # 20 GB/s memory
    cache_bytes_per_us=1e5,  # 100 GB/s cache
    cache_bytes=2e7,
    cache_sharpness=4.0,
)


def _memcpy_rows(models: list[str], curve: OpFactors = CURVE) -> pd.DataFrame:
    return _table(models, factors=curve, op="memcpy")


def test_memory_curve_from_memcpy_rows():
    """memcpy rows made from a known curve give it back; fewer than four rows give none."""
    rows = _memcpy_rows(["FLAME-MoE-290M", "OLMoE-1B-7B", "DeepSeek-V3"])
    got = fit_memory_curve(rows)
    assert got is not None
    bw = np.array([1e4, 1e6, 1e7, 2e7, 1e8, 1e9])
    pred = predict_us(got, np.zeros(bw.size), bw, np.ones(bw.size))
    np.testing.assert_allclose(
        pred, predict_us(CURVE, np.zeros(bw.size), bw, np.ones(bw.size)), rtol=0.02
    )
    assert fit_memory_curve(rows.iloc[:3]) is None
    assert fit_memory_curve(rows.iloc[:4]) is not None  # four rows are enough
    assert fit_memory_curve(_table(["FLAME-MoE-290M"])) is None  # no memcpy rows


def test_calibration_on_the_memory_curve_fits_a_traffic_factor(monkeypatch):
    """An op moving 3x the bytes it is counted for, on the device's curve: the fit keeps
    the curve's cache step and divides both bandwidths by 3. (Without the launch prior,
    to check the exact recovery: 5 µs of launch is lost in times of milliseconds, so
    the prior takes it to the curve's 1 µs; see the test after this one.)"""
    import moesim.costs.model as cost_model

    monkeypatch.setattr(cost_model, "LAUNCH_PRIOR", 0.0)
    op = OpFactors(
        launch_us=5.0,
        peak_flop_per_us=5e4,
        bytes_per_us=CURVE.bytes_per_us / 3,
        half_tokens=12.0,
        cache_bytes_per_us=CURVE.cache_bytes_per_us / 3,
        cache_bytes=CURVE.cache_bytes,
        cache_sharpness=CURVE.cache_sharpness,
    )
    rows = _table(["FLAME-MoE-290M", "OLMoE-1B-7B", "Mixtral-8x7B"], factors=op)
    fit = calibrate(rows, memory=CURVE)
    assert (fit.cache_bytes, fit.cache_sharpness) == (CURVE.cache_bytes, CURVE.cache_sharpness)
    assert fit.bytes_per_us == pytest.approx(CURVE.bytes_per_us / 3, rel=0.02)
    assert fit.cache_bytes_per_us == pytest.approx(CURVE.cache_bytes_per_us / 3, rel=0.02)
    assert fit.launch_us == pytest.approx(5.0, rel=0.05)
    # a table with memcpy rows calibrates every op on the curve its memcpy rows give
    table = pd.concat([rows, _memcpy_rows(["FLAME-MoE-290M", "DeepSeek-V3"])], ignore_index=True)
    cm = CostModel.from_table(table)
    f = cm.factors[("expert_ffn_bmm", "fp32")]
    assert f.cache_bytes == pytest.approx(CURVE.cache_bytes, rel=0.02)
    assert f.bytes_per_us == pytest.approx(CURVE.bytes_per_us / 3, rel=0.05)


def test_launch_prior_keeps_an_unseen_launch_near_the_devices():
    """Shapes whose smallest calls take milliseconds cannot show a launch overhead; without
    the prior the fit may trade memory time for launch time, and a smaller shape is then
    predicted too slow. With it, the launch stays near the memory curve's."""
    op = replace(CURVE, peak_flop_per_us=5e4, half_tokens=12.0)
    rows = _table(["OLMoE-1B-7B", "Mixtral-8x7B"], factors=op, noise=0.05)
    fit = calibrate(rows, memory=CURVE)
    assert fit.launch_us < 3 * CURVE.launch_us
    small = _table(["FLAME-MoE-290M"], factors=op)
    pred = predict_us(fit, small["flops"], small["bytes"], small["tokens"])
    assert np.abs(pred / small["median_us"] - 1).max() < 0.15


def test_memory_curve_predicts_a_shape_beyond_the_measured_working_sets():
    """Training shapes whose weights all fit in the cache say nothing about memory speed
    on their own; with the device's curve from memcpy, a shape whose weights do not fit is
    predicted at memory speed."""
    op = OpFactors(
        launch_us=5.0,
        peak_flop_per_us=5e4,
        bytes_per_us=CURVE.bytes_per_us,
        cache_bytes_per_us=CURVE.cache_bytes_per_us,
        cache_bytes=CURVE.cache_bytes,
        cache_sharpness=CURVE.cache_sharpness,
    )
    train = _table(["FLAME-MoE-290M"], factors=op)  # 2 experts' weights: 17 MB, cached
    train = train[train["bytes"] < 2.5e7]
    held = _table(["DeepSeek-V3"], factors=op)  # 2 experts' weights: 350 MB
    memcpy = _memcpy_rows(["FLAME-MoE-290M", "OLMoE-1B-7B", "DeepSeek-V3"])
    s = _shape("DeepSeek-V3")
    tok = held["tokens"].to_numpy(float)[:4]
    with_curve = CostModel.from_table(pd.concat([train, memcpy], ignore_index=True))
    pred = with_curve.roofline_us("expert_ffn_bmm", s, tok, "fp32")
    np.testing.assert_allclose(pred, held["median_us"].to_numpy()[:4], rtol=0.1)


def _benchmark_module():
    from tests.conftest import load_benchmark

    return load_benchmark("cost_model_error")


def test_repeat_floor_pairs_equal_calls_of_two_shapes():
    """OLMoE-1B-7B and DeepSeekMoE-16B both have d_model 2048: their memcpy rows are the
    same call; measured 2x apart, the floor is |2 - 1| and |1/2 - 1|. FLAME's rows pair
    with nothing."""
    bench = _benchmark_module()
    rows = _memcpy_rows(["OLMoE-1B-7B", "DeepSeekMoE-16B", "FLAME-MoE-290M"])
    rows.loc[rows["model"] == "DeepSeekMoE-16B", "median_us"] *= 2.0
    rep = bench.repeat_errors(rows)
    assert len(rep) == 2 * len(TOKENS)
    assert sorted(set(np.round(rep["err"], 9))) == [0.5, 1.0]


def test_held_out_shape_protocol_drops_the_shape_from_every_op():
    """A shape's memcpy rows do not inform the prediction of its own other ops: with the
    held-out shape's memcpy rows made absurd, its FFN predictions do not move."""
    bench = _benchmark_module()
    models = ["FLAME-MoE-290M", "OLMoE-1B-7B", "Mixtral-8x7B"]
    table = pd.concat([_table(models), _memcpy_rows(models)], ignore_index=True)
    table["threads"] = 1
    base = bench.held_out_errors(table)
    odd = table.copy()
    odd.loc[(odd["model"] == "Mixtral-8x7B") & (odd["op"] == "memcpy"), "median_us"] *= 50
    moved = bench.held_out_errors(odd)
    ffn = (base["op"] == "expert_ffn_bmm") & (base["model"] == "Mixtral-8x7B")
    np.testing.assert_allclose(moved[ffn]["predicted_us"], base[ffn]["predicted_us"])
    assert set(base["model"]) == set(models) and set(base["op"]) == {"expert_ffn_bmm", "memcpy"}


def test_layer_costs_take_measured_parts_from_the_cost_model():
    """With a measured table, router, attention (prefill), shared experts and dense FFN come
    from it: at measured token counts exactly the measured times (attention: one call per
    sequence, plus the roofline's norms); without a table nothing changes."""
    from dataclasses import replace

    from moesim.costs.roofline import layer_costs

    hw = get_profile("H100-SXM")
    shape = get_preset("DeepSeek-V3")
    bench = BenchShape.from_model(shape, local_experts=1)
    shared = replace(bench, d_ff=(shape.shared_expert_d_ff or shape.expert_d_ff))
    dense = replace(bench, d_ff=shape.dense_d_ff)
    measured = {  # (op, bench shape, dtype) -> {tokens: µs}
        ("router", bench, "bf16"): {1024: 30.0, 4096: 90.0},
        ("attention", bench, "bf16"): {1024: 700.0, 4096: 5000.0},
        ("expert_ffn_loop", shared, "bf16"): {1024: 200.0, 4096: 600.0},
        ("expert_ffn_loop", dense, "bf16"): {1024: 1500.0, 4096: 5500.0},
    }
    rows = []
    for (op, s, dt), points in measured.items():
        for t, us in points.items():
            fl, by, _ = op_work(op, s, t, dt)
            rows.append(
                {"op": op, "dtype": dt, "tokens": t, "flops": fl, "bytes": by, "median_us": us}
                | table_widths(op, s)
            )
    cm = CostModel.from_table(pd.DataFrame(rows), hw)
    kw = dict(tokens=4096, sequence_length=1024, dtype="bf16")
    base = layer_costs(shape, hw, mode="prefill", **kw)
    assert layer_costs(shape, hw, mode="prefill", model=CostModel(hw=hw), **kw) == base
    got = layer_costs(shape, hw, mode="prefill", model=cm, **kw)
    norms = (
        2 * 2 * 4096 * shape.d_model * 2 / (hw.memory.hbm_bandwidth_gbps * hw.efficiency.hbm * 1e3)
    )
    assert got.router_us == pytest.approx(90.0)
    assert got.attention_us == pytest.approx(4 * 700.0 + norms)
    assert got.shared_us == pytest.approx(600.0) and got.dense_ffn_us == pytest.approx(5500.0)
    decode = layer_costs(shape, hw, mode="decode", model=cm, **kw)
    assert decode.attention_us == layer_costs(shape, hw, mode="decode", **kw).attention_us
    assert decode.router_us == pytest.approx(90.0)


def test_measured_shared_experts_are_one_call_of_their_summed_width():
    """FLAME-MoE-290M's 2 shared experts of 704 run as one expert of 1,408: with that
    shape measured (200 us at 1,024 tokens, 600 at 4,096), the shared part at 4,096
    tokens is the measured 600 us."""
    from moesim.costs.roofline import layer_costs

    hw = get_profile("H100-SXM")
    shape = get_preset("FLAME-MoE-290M")
    assert (shape.num_shared_experts, shape.expert_d_ff) == (2, 704)
    shared = replace(BenchShape.from_model(shape, local_experts=1), d_ff=1408)
    rows = []
    for t, us in {1024: 200.0, 4096: 600.0}.items():
        fl, by, _ = op_work("expert_ffn_loop", shared, t, "bf16")
        rows.append(
            {"op": "expert_ffn_loop", "dtype": "bf16", "tokens": t, "flops": fl, "bytes": by,
             "median_us": us} | table_widths("expert_ffn_loop", shared)
        )  # fmt: skip
    cm = CostModel.from_table(pd.DataFrame(rows), hw)
    got = layer_costs(
        shape, hw, tokens=4096, sequence_length=1024, mode="prefill", dtype="bf16", model=cm
    )
    assert got.shared_us == pytest.approx(600.0)


def test_profile_roofline_is_the_cost_models_smooth_max_hand_checked():
    """The non-expert parts are timed by the rule the experts are: the cost model's smooth
    maximum of compute and memory time (:func:`predict_us`), less its launch."""
    from moesim.costs.roofline import expert_ffn_time_us, gemm_time_us, memory_time_us

    hw = round_h100(1000.0, 2000.0)  # 5e8 FLOP/µs, 1e6 bytes/µs
    # (1500, 1500) @ (1500, 1500), bf16: 2 * 1500**3 = 6.75e9 FLOP / 5e8 = 13.5 µs of
    # compute, 2 * 3 * 1500**2 = 1.35e7 bytes / 1e6 = 13.5 µs of memory; smooth max
    # (13.5**4 + 13.5**4) ** (1/4) = 13.5 * 2 ** 0.25 = 13.5 * 1.1892071 = 16.054296 µs
    # (a plain max: 13.5)
    assert float(gemm_time_us(1500, 1500, 1500, hw, "bf16")) == pytest.approx(16.054296)
    f = profile_factors(hw, "bf16")
    assert float(predict_us(f, 6.75e9, 1.35e7, 1500)) == pytest.approx(5.0 + 16.054296)
    assert float(memory_time_us(3e6, hw)) == pytest.approx(3.0)  # 3e6 bytes / 1e6
    # gated FFN (3 matrices), d_model = d_ff = 1,500, 1,500 tokens: two up GEMMs and a down
    # GEMM, each the GEMM above: 3 * 16.054296 = 48.162888 µs; no tokens: 0
    ffn = expert_ffn_time_us(np.array([0.0, 1500.0]), 1500, 1500, 3, hw, "bf16")
    np.testing.assert_allclose(ffn, [0.0, 48.162888], rtol=1e-6)


def test_gemm_small_batch_term_is_half_outputs_over_the_width_hand_checked():
    """A GEMM of M x N outputs takes flops x (M N + H) / (M N) of arithmetic time: with
    H = 2.25e6 half outputs, (1500, 1500) @ (1500, 1500) has 2.25e6 outputs, so twice the
    arithmetic, 27 µs, against 13.5 µs of memory: (27**4 + 13.5**4) ** (1/4)
    = 13.5 x 17 ** 0.25 = 13.5 x 2.0305432 = 27.412333 µs."""
    from moesim.costs.fit import with_efficiency
    from moesim.costs.roofline import gemm_time_us

    hw = with_efficiency(round_h100(1000.0, 2000.0), gemm_half_outputs=2.25e6)
    assert float(gemm_time_us(1500, 1500, 1500, hw, "bf16")) == pytest.approx(27.412333)
    # a 15,000-wide GEMM of the same rows has ten times the outputs: 1.1 x its arithmetic,
    # 2 x 1500 x 15000 x 1500 = 6.75e10 FLOP / 5e8 = 135 µs x 1.1 = 148.5 µs, against
    # 2 bytes x (1500 x 1500 + 1500 x 15000 + 1500 x 15000) = 9.45e7 bytes = 94.5 µs:
    # (148.5**4 + 94.5**4) ** (1/4) = 148.5 x (1 + (7/11)**4) ** 0.25 = 154.246 µs
    assert float(gemm_time_us(1500, 15000, 1500, hw, "bf16")) == pytest.approx(
        148.5 * (1 + (7 / 11) ** 4) ** 0.25
    )


def test_fp8_gemm_efficiency_falls_back_to_the_gemms():
    hw = get_profile("H800")
    assert hw.efficiency.gemm_factors(True) == (0.70, 244000.0)  # no gemm_fp8: gemm's
    from moesim.costs.fit import with_efficiency

    fast = with_efficiency(hw, gemm_fp8=0.6, gemm_fp8_half_outputs=1000.0)
    assert fast.efficiency.gemm_factors(True) == (0.6, 1000.0)
    assert fast.efficiency.gemm_factors(False) == (0.70, 244000.0)
    f = profile_factors(fast, "fp8", width=500.0)
    assert (f.peak_flop_per_us, f.half_tokens) == pytest.approx((1978.9 * 0.6 * 1e6, 2.0))


def test_decode_attention_scores_smooth_max_hand_checked():
    """Decode scores read the KV cache and do their arithmetic in one kernel: the smooth
    maximum of the two; prefill scores are arithmetic alone. FLAME-MoE-290M (16 heads of
    64, MHA), 1 token, sequence 1,000, on a profile with 1e6 FLOP/µs and 1e6 bytes/µs."""
    from moesim.costs.roofline import layer_costs

    hw = round_h100(2.0, 2000.0)
    shape = get_preset("FLAME-MoE-290M")
    kw = dict(tokens=1, sequence_length=1000, dtype="bf16")
    decode = layer_costs(shape, hw, mode="decode", **kw)
    prefill = layer_costs(shape, hw, mode="prefill", **kw)
    # decode: 2 * 1 * 1000 * 16 * (64 + 64) = 4.096e6 FLOP -> 4.096 µs; KV read
    # 1 * 1000 * 2 B * 2 (K, V) * 16 * 64 = 4.096e6 bytes -> 4.096 µs; smooth max
    # 4.096 * 2 ** 0.25 = 4.870992 µs. Prefill: 2 * 1 * 500 * 16 * 128 = 2.048e6 FLOP ->
    # 2.048 µs. The projections, norms and launches are the same in both modes.
    assert decode.attention_us - prefill.attention_us == pytest.approx(4.870992 - 2.048)
    assert (decode.router_us, decode.shared_us) == (prefill.router_us, prefill.shared_us)
    # router: (1, 1024) @ (1024, 64), 2 x 64 x 1024 = 131,072 FLOP -> 0.131072 µs against
    # 2 B x (1024 + 65,536 + 64) = 133,248 bytes -> 0.133248 µs: smooth max 0.157182 µs,
    # plus 2 launches of 5 µs = 10.157182 µs
    assert prefill.router_us == pytest.approx(10.157182, abs=1e-6)
    # 2 shared experts of 704 -> d_ff 1,408, gated: each of 3 GEMMs 2,883,584 FLOP ->
    # 2.883584 µs against 2 B x (1024 + 1,441,792 + 1408) = 2,888,448 bytes -> 2.888448 µs,
    # smooth max (2.883584**4 + 2.888448**4) ** 0.25 = 3.432074 µs; 3 x 3.432074 + 3
    # launches of 5 µs = 25.296223 µs
    assert prefill.shared_us == pytest.approx(25.296223, abs=1e-6)


def test_cost_model_is_cached_by_profile_content_not_name(tmp_path, monkeypatch):
    """Two profiles with the same name but other figures (a gemm efficiency, a table
    folder) get their own calibrated models, each with its own profile; an equal profile
    gets the cached one."""
    import moesim.paths
    from moesim.kernels.tables import write_op_table

    for folder, scale in (("a", 1.0), ("b", 2.0)):  # folder b: twice as slow
        rows = _memcpy_rows(["FLAME-MoE-290M"])
        us = scale * rows["median_us"]
        rows = rows.assign(median_us=us, p10_us=us, p90_us=us, min_us=us, repeats=5, rounds=5)
        rows = rows.assign(warmup=2, threads=1, torch_version="2.13.0+cpu", device="test cpu")
        write_op_table(tmp_path / "kernels" / "measured" / folder, "memcpy", rows)
    hw = get_profile("H100-SXM").model_copy(update={"kernel_tables": "a"})
    monkeypatch.setattr(moesim.paths, "repo_root", lambda: tmp_path)
    slower = hw.model_copy(update={"efficiency": hw.efficiency.model_copy(update={"gemm": 0.35})})
    other = hw.model_copy(update={"kernel_tables": "b"})
    a, s, o = cost_model_for(hw), cost_model_for(slower), cost_model_for(other)
    assert cost_model_for(hw.model_copy()) is a
    assert (a.hw, s.hw, o.hw) == (hw, slower, other)
    # an op the table lacks is timed by the profile: 989.4 TFLOP/s * 0.70 * 1e6 FLOP/µs,
    # and * 0.35 (half of it) for the slower copy
    assert a.op_factors("router", "bf16").peak_flop_per_us == pytest.approx(6.9258e8)
    assert s.op_factors("router", "bf16").peak_flop_per_us == pytest.approx(3.4629e8)
    # the other folder's table, twice as slow (tables keep 6 significant digits)
    np.testing.assert_allclose(o.table["median_us"], 2 * a.table["median_us"], rtol=1e-5)


def test_two_shapes_with_equal_widths_interpolate_their_median():
    """OLMoE-1B-7B and DeepSeekMoE-16B memcpy rows are the same call (d_model 2048): the
    table gives one point per token count, the median of the two (here their mean)."""
    rows = _memcpy_rows(["OLMoE-1B-7B", "DeepSeekMoE-16B"])
    rows.loc[rows["model"] == "DeepSeekMoE-16B", "median_us"] *= 3.0
    cm = CostModel.from_table(rows)
    s = _shape("OLMoE-1B-7B")
    base = rows[rows["model"] == "OLMoE-1B-7B"]["median_us"].to_numpy()
    got = cm.time_us("memcpy", s, np.array(TOKENS, dtype=float), "fp32")
    np.testing.assert_allclose(got, np.maximum.accumulate(2.0 * base), rtol=1e-9)


def test_router_tile_width_hand_checked_and_recovered():
    """A router with fewer experts than the GEMM tile costs as if it had a tile of them."""
    f = OpFactors(launch_us=0.0, peak_flop_per_us=1.0, bytes_per_us=1e12, tile_width=32.0)
    fl = np.array([100.0, 100.0, 100.0])
    t = predict_us(f, fl, np.zeros(3), np.full(3, 1e9), np.array([8.0, 32.0, 64.0]))
    np.testing.assert_allclose(t, [400.0, 100.0, 100.0], rtol=1e-6)  # 8 wide: 32/8 = 4x
    assert gemm_width("router", 8.0) == 8.0 and np.isinf(gemm_width("permute", 8.0))
    # router rows timed with a 32-wide tile: Mixtral (8 experts) and three 64-expert shapes
    true = replace(TRUE, tile_width=32.0)
    models = ["Mixtral-8x7B", "FLAME-MoE-290M", "OLMoE-1B-7B", "Qwen2-57B-A14B"]
    rows = []
    for m in models:
        s = _shape(m)
        for tok in TOKENS:
            fl, by, _ = op_work("router", s, tok, "fp32")
            us = predict_us(true, np.array([fl]), np.array([by]), np.array([tok]), s.num_experts)
            rows.append({"flops": fl, "bytes": by, "tokens": tok, "median_us": float(us[0]),
                         "num_experts": s.num_experts})  # fmt: skip
    table = pd.DataFrame(rows)
    width = gemm_width("router", table["num_experts"].to_numpy(float))
    fit = calibrate(table, width=width)
    assert fit.tile_width == pytest.approx(32.0, rel=0.1)
    assert calibrate(table).tile_width == 1.0  # no widths given: no tile term
    pred = predict_us(fit, table["flops"], table["bytes"], table["tokens"], width)
    np.testing.assert_allclose(pred, table["median_us"], rtol=0.02)


def test_two_cache_levels_from_memcpy_rows():
    """A device with a near cache inside its last-level cache (a CPU's L2 in its L3):
    memcpy rows made from that curve give it back, both steps where they are."""
    curve = replace(
        CURVE,
        cache_bytes=5e7,
        near_bytes_per_us=4e5,  # 400 GB/s below ~2 MB
        near_bytes=2e6,
        near_sharpness=4.0,
    )
    rows = _memcpy_rows(["FLAME-MoE-290M", "OLMoE-1B-7B", "Qwen2-57B-A14B", "DeepSeek-V3"], curve)
    got = fit_memory_curve(rows)
    assert got is not None and got.near_bytes_per_us is not None
    b = np.geomspace(1e4, 1e9, 31)
    np.testing.assert_allclose(bandwidth(got, b), bandwidth(curve, b), rtol=0.05)
    assert got.near_bytes == pytest.approx(2e6, rel=0.2)
    assert got.cache_bytes == pytest.approx(5e7, rel=0.2)
    # the bandwidth of a call is that of the level its bytes fit in
    assert bandwidth(curve, 1e5) == pytest.approx(4e5, rel=0.01)
    assert bandwidth(curve, 1e7) == pytest.approx(1e5, rel=0.02)
    assert bandwidth(curve, 1e9) == pytest.approx(2e4, rel=0.01)


def test_op_elements_hand_checked():
    """The router scores every (token, expert) pair, permute sorts every (token, choice)."""
    np.testing.assert_array_equal(op_elements("router", np.array([1.0, 16.0]), 64, 6), [64, 1024])
    np.testing.assert_array_equal(op_elements("permute", np.array([1.0, 16.0]), 64, 6), [6, 96])
    assert op_elements("expert_ffn_bmm", np.array([4.0]), 4, 0).tolist() == [0.0]
    # rows whose widths come as arrays: one 0 per row, even for a single token count
    assert op_elements("attention", 3.0, np.array([8.0, 64.0]), 2.0).tolist() == [0.0, 0.0]
    f = OpFactors(launch_us=1.0, peak_flop_per_us=1.0, bytes_per_us=1e12, element_us=0.5)
    # 1 µs launch + 10 flops at 1 flop/µs (smooth max with ~0 memory time) + 4 x 0.5 µs
    assert predict_us(f, np.array([10.0]), np.array([0.0]), np.array([1.0]), elements=4.0)[
        0
    ] == pytest.approx(13.0)


def test_router_epilogue_is_fitted_and_carries_to_an_unseen_shape():
    """Router rows whose time is a GEMM plus a per-(token, expert) epilogue: the fit finds
    the epilogue's cost, and a held-out shape with another d_model and expert count is
    predicted from it (a GEMM-only roofline cannot: its time per token would follow
    d_model x experts, not the experts alone)."""
    true = replace(CURVE, peak_flop_per_us=2e5, element_us=0.01)

    def rows(models: list[str]) -> pd.DataFrame:
        out = []
        for m in models:
            s = BenchShape.from_model(get_preset(m), local_experts=1)
            for t in TOKENS:
                fl, by, _ = op_work("router", s, t, "fp32")
                el = op_elements("router", t, s.num_experts, s.top_k)
                us = float(predict_us(true, fl, by, t, np.inf, el))
                out.append(
                    {"op": "router", "dtype": "fp32", "tokens": t, **table_widths("router", s)}
                    | {"flops": fl, "bytes": by, "median_us": us, "model": m}
                )
        return pd.DataFrame(out)

    train = rows(["FLAME-MoE-290M", "Qwen2-57B-A14B", "DeepSeek-V3"])
    el = op_elements("router", train["tokens"], train["num_experts"], train["top_k"])
    fit = calibrate(train, memory=CURVE, elements=el)
    assert fit.element_us == pytest.approx(0.01, rel=0.05)
    held = rows(["DeepSeek-V2"])
    cm = CostModel.from_table(pd.concat([train, _memcpy_rows(["OLMoE-1B-7B"])]))
    s = BenchShape.from_model(get_preset("DeepSeek-V2"), local_experts=1)
    pred = cm.roofline_us("router", s, held["tokens"].to_numpy(float), "fp32")
    np.testing.assert_allclose(pred, held["median_us"], rtol=0.05)


def test_small_batch_term_as_weight_traffic_hand_checked():
    """half_cache 1: the small-batch term runs at the memory curve's speed for the call's
    bytes. 1 kB sits far inside a 1 MB cache of 4x memory speed: half_tokens 9 -> 9 x 10 /
    40 = 2.25; at 1 token, 1e5 FLOP at 1e3 FLOP/µs: 1e5 x 3.25 / 1e3 = 325 µs of
    arithmetic against 25 µs of memory (the smooth maximum adds 0.003 µs); half_cache 0:
    1e5 x 10 / 1e3 = 1000 µs."""
    f = OpFactors(
        launch_us=0.0,
        peak_flop_per_us=1e3,
        bytes_per_us=10.0,
        half_tokens=9.0,
        cache_bytes_per_us=40.0,
        cache_bytes=1e6,
        cache_sharpness=8.0,
        half_cache=1.0,
    )
    one = np.array([1.0])
    assert predict_us(f, one * 1e5, one * 1e3, one)[0] == pytest.approx(325.0, abs=0.01)
    fixed = replace(f, half_cache=0.0)
    assert predict_us(fixed, one * 1e5, one * 1e3, one)[0] == pytest.approx(1000.0, abs=0.01)
    # beyond the cache both forms agree: the term runs at memory speed either way
    big = one * 1e9
    assert predict_us(f, one * 1e12, big, one)[0] == pytest.approx(
        predict_us(fixed, one * 1e12, big, one)[0], rel=1e-6
    )


@pytest.mark.parametrize("half_cache", [0.0, 1.0])
def test_the_small_batch_terms_form_is_chosen_by_held_out_shapes(half_cache):
    """Tables timed with either form of the small-batch term, FLAME-MoE-290M's weights
    (17 MB at 2 experts) inside the curve's 20 MB cache and the others' beyond: the
    leave-one-shape-out choice finds the form that made them, and the shape inside the
    cache is then predicted from the others within 2 %."""
    op = replace(CURVE, launch_us=1.0, peak_flop_per_us=5e4, half_tokens=30.0)
    op = replace(op, half_cache=half_cache)
    models = ["FLAME-MoE-290M", "OLMoE-1B-7B", "DeepSeekMoE-16B", "Mixtral-8x7B", "DeepSeek-V3"]
    memcpy = _memcpy_rows(["FLAME-MoE-290M", "DeepSeek-V3"])
    table = pd.concat([_table(models, factors=op), memcpy], ignore_index=True)
    cm = CostModel.from_table(table)
    assert cm.factors[("expert_ffn_bmm", "fp32")].half_cache == half_cache
    train = table[table["model"] != "FLAME-MoE-290M"]
    held = CostModel.from_table(pd.concat([train, memcpy], ignore_index=True))
    rows = table[(table["model"] == "FLAME-MoE-290M") & (table["op"] == "expert_ffn_bmm")]
    pred = held.roofline_us("expert_ffn_bmm", _shape("FLAME-MoE-290M"), rows["tokens"], "fp32")
    assert np.abs(pred / rows["median_us"] - 1).max() < 0.02


def test_router_arithmetic_is_padded_to_the_tile():
    """The router's GEMM is E = 8 columns wide; with a tile of 32 columns its arithmetic is
    that of 32 (4 x), the small-batch term and memory being nil here: 4 x the time with
    a tile of one column."""
    s = BenchShape.from_model(get_preset("Mixtral-8x7B"), local_experts=1)
    assert s.num_experts == 8
    times = []
    for tile in (1.0, 32.0):
        f = OpFactors(launch_us=0.0, peak_flop_per_us=1e6, bytes_per_us=1e30, tile_width=tile)
        cm = CostModel(factors={("router", "fp32"): f})
        times.append(cm.roofline_us("router", s, np.array([64.0]), "fp32")[0])
    assert times[1] == pytest.approx(4 * times[0], rel=1e-9)


def test_table_widths_zero_the_columns_an_op_does_not_use():
    """FLAME-MoE-290M (d_model 1024, d_ff 704, 64 experts, top-6, 16 heads of 64), 4 local
    experts: a row records only the widths its op runs at, 0 elsewhere."""
    s = BenchShape.from_model(get_preset("FLAME-MoE-290M"), local_experts=4)
    zero = dict.fromkeys(
        ("d_ff", "num_experts", "top_k", "num_heads", "num_kv_heads", "head_dim", "v_head_dim"), 0
    )
    assert table_widths("router", s) == zero | {"d_model": 1024, "num_experts": 64, "top_k": 6}
    assert table_widths("expert_ffn_grouped", s) == zero | {
        "d_model": 1024,
        "d_ff": 704,
        "num_experts": 4,
    }
    assert table_widths("attention", s) == zero | {
        "d_model": 1024,
        "num_heads": 16,
        "num_kv_heads": 16,
        "head_dim": 64,
        "v_head_dim": 64,
    }
    assert table_widths("memcpy", s) == zero | {"d_model": 1024}


def test_bench_shape_scores_experts_as_the_model_does():
    """DeepSeek-V3 (MLA, a routing bias) scores experts with a sigmoid; FLAME-MoE-290M
    with a softmax."""
    assert BenchShape.from_model(get_preset("DeepSeek-V3"), 8).router_score == "sigmoid"
    assert BenchShape.from_model(get_preset("FLAME-MoE-290M"), 4).router_score == "softmax"


def test_whole_token_counts_are_not_rounded():
    """Token counts given as integers are timed as the same counts given as floats: the
    roofline time of 100 tokens (a fraction of a µs above a whole number) is not cut to
    an integer."""
    cm = cost_model_for(get_profile("H100-SXM"))
    s = BenchShape.from_model(get_preset("FLAME-MoE-290M"), local_experts=4)
    as_float = cm.time_us("expert_ffn_grouped", s, np.array([100.0, 3.0]), "bf16")
    assert (as_float % 1 != 0).all()
    as_int = cm.time_us("expert_ffn_grouped", s, np.array([100, 3]), "bf16")
    assert as_int.dtype == np.float64
    assert as_int.tolist() == as_float.tolist()


def test_small_batch_term_choice_on_the_measured_amd_router_tables():
    """A pin of the leave-one-shape-out choice on data where it decides: on the shipped
    AMD EPYC router rows (with the memory curve), the bf16 router's small-batch term is
    weight traffic (1) and the fp32 router's a fixed cost (0). Scoring each shape on the
    rows it was fitted to, or without the token correction, chooses otherwise."""
    from moesim.kernels.tables import load_table

    folder = REPO / "kernels" / "measured" / "amd-epyc"
    cm = CostModel.from_table(load_table(folder, ops=["memcpy", "router"]))
    assert cm.factors[("router", "bf16")].half_cache == 1.0
    assert cm.factors[("router", "fp32")].half_cache == 0.0
