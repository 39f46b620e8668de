"""Reports: sweep results folders (the shared schema), simulate folders, byte-identity."""

from __future__ import annotations

import re
import shutil

import pyarrow.parquet as pq
import pytest

from moesim.errors import InputError
from moesim.report.page import SECTION_ORDER
from moesim.report.sweep import write_sweep_report
from tests.conftest import assert_one_line_error, run_moesim
from tests.report_fixtures import write_sweep_fixture


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return write_sweep_fixture(tmp_path_factory.mktemp("sweep") / "results")


def _section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', html)


def test_sweep_report_has_every_section_in_order(sweep_dir, tmp_path):
    files = write_sweep_report(sweep_dir, tmp_path / "a")
    html = files["report.html"].read_text()
    assert _section_ids(html) == [k for k, _ in SECTION_ORDER]
    # figures where the data exists: memory, breakdown, drops vs capacity factor, scaling
    assert html.count("<svg") == 4
    assert "capacity factor" in html and "ideal" in html
    # sections without data say so
    assert "A sweep keeps no per-device loads" in html
    assert "Fewer than two placement strategies" in html
    # the answer comes first and names the fastest case and the failed one
    answer = html[html.index('id="answer"') : html.index('id="cluster"')]
    assert "highest throughput" in answer and "1 failed" in answer and "case 8" in answer
    md = files["summary.md"].read_text()
    assert md.index("## Answer") < md.index("## Drop rate versus capacity factor")
    # nothing fetched from the network, no script
    for external in ('src="http', 'href="http', "url(http", "@import", "<script", "<link"):
        assert external not in html
    assert "<metadata>" not in html  # no RDF block (and no date) in the figures


def test_sweep_report_is_byte_identical_and_cli_works(sweep_dir, tmp_path):
    write_sweep_report(sweep_dir, tmp_path / "a")
    proc = run_moesim("report", str(sweep_dir), "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    for name in ("report.html", "summary.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _answer_md(folder, out) -> str:
    md = write_sweep_report(folder, out)["summary.md"].read_text()
    return md[md.index("## Answer") : md.index("## Model and cluster")]


def test_sweep_answer_keeps_to_the_drop_budget(sweep_dir, tmp_path):
    df = pq.read_table(sweep_dir / "results.parquet").to_pandas()
    ok = df[df["status"] == "ok"]
    dropless = ok[ok["capacity_factor"].isna()]
    # no budget in sweep.json: the best answer is the fastest dropless case
    answer = _answer_md(sweep_dir, tmp_path / "a")
    best = dropless.loc[dropless["tokens_per_s"].idxmax()]
    assert f"{best['tokens_per_s']:,.0f} tokens/s at 0.000% dropped" in answer
    assert "factor=dropless, nodes=2" in answer
    assert "dropless cases only" in answer and "6 case(s) over the drop budget" in answer
    # a budget of 50 % admits every case: the fastest of all, with its drop rate beside it
    wide = write_sweep_fixture(tmp_path / "wide", max_drop_rate=0.5)
    answer = _answer_md(wide, tmp_path / "b")
    top = ok.loc[ok["tokens_per_s"].idxmax()]
    assert f"{top['tokens_per_s']:,.0f} tokens/s at {100 * top['drop_rate']:.3f}% dropped" in answer
    assert "at most 50% of assignments" in answer and "left out" not in answer


def test_drop_rate_falls_with_capacity_factor_in_the_table(sweep_dir):
    df = pq.read_table(sweep_dir / "results.parquet").to_pandas()
    ok = df[df["status"] == "ok"]
    for _, g in ok.groupby("nodes"):
        rates = g.sort_values("capacity_factor")["drop_rate"].to_numpy()
        assert (rates[:-1] >= rates[1:]).all() and rates[0] > rates[-1]


def test_simulate_folder_report_matches_simulate(tmp_path, flame_dict, write_scenario):
    scenario = write_scenario(flame_dict | {"mode": ["training", "prefill"]})
    sim = tmp_path / "sim"
    assert run_moesim("simulate", str(scenario), "--out", str(sim)).returncode == 0
    proc = run_moesim("report", str(sim), "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    html = (sim / "report.html").read_text()
    assert (tmp_path / "again" / "report.html").read_text() == html
    assert (tmp_path / "again" / "summary.md").read_bytes() == (sim / "summary.md").read_bytes()
    assert _section_ids(html) == [k for k, _ in SECTION_ORDER]
    # memory, breakdown, heatmap + balance, port bytes, timeline
    assert html.count("<svg") == 6
    table = html[html.index('id="stragglers"') : html.index('id="drops"')]
    assert table.count("<tr>") == 1 + 8  # header + one row per MoE layer
    lay = pq.read_table(sim / "layers.parquet").to_pandas()
    lay = lay[(lay["mode"] == "training") & (lay["step"] == lay["step"].max())]
    for r in lay.sort_values("layer").to_dict("records"):  # device and cause of each row
        assert f'<td>{r["straggler_device"]}</td><td class="l">{r["straggler_cause"]}</td>' in table
    heat = html[html.index('id="heatmap"') : html.index('id="stragglers"')]
    assert "capacity factor needed to drop nothing" in heat
    assert heat.count("<tr>") == 1 + 8
    assert "One capacity factor in a single run" in html


def test_report_bad_folders(tmp_path, sweep_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        run_moesim("report", str(empty), "--out", str(tmp_path / "o")), "RESULTS_DIR"
    )
    broken = tmp_path / "broken"
    shutil.copytree(sweep_dir, broken)
    table = pq.read_table(broken / "results.parquet").drop(["tokens_per_s"])
    pq.write_table(table, broken / "results.parquet")
    with pytest.raises(InputError, match="tokens_per_s"):
        write_sweep_report(broken, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written


def test_sweep_with_only_failed_cases(sweep_dir, tmp_path):
    folder = tmp_path / "failed"
    folder.mkdir()
    table = pq.read_table(sweep_dir / "results.parquet")
    failed = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "error"]
    pq.write_table(table.take(failed), folder / "results.parquet")
    html = write_sweep_report(folder, folder)["report.html"].read_text()
    assert "No case finished (1 failed)" in html
    assert _section_ids(html) == [k for k, _ in SECTION_ORDER]
    assert "<svg" not in html


def test_report_warnings_come_first_and_say_what_applies():
    from moesim.report.summary import dispatcher_text, report_warnings

    fits = {"mode": "prefill", "dropped": 0, "memory_fits": True}
    assert report_warnings([fits], "") == []
    drops = {
        "mode": "training",
        "drop_rate": 275_657 / 524_288,
        "dropped": 275_657,
        "assignments": 524_288,
        "capacity_factor": 1.0,
        "memory_fits": False,
        "memory_per_device_bytes": 95.05e9,
        "hbm_bytes": 80e9,
    }
    assert report_warnings([drops], "device 3 compute x1.5") == [
        "WARNING: training does not fit in HBM: 95.0 GB per device, 80.0 GB HBM",
        # 275,657 / 524,288 = 52.577 %
        "WARNING: training drops 52.577% of assignments (275,657 of 524,288) at capacity "
        "factor 1.0, where serving and dropless training drop none (capacity.factor: null)",
        "INJECTED: device 3 compute x1.5; step times include this slowness",
    ]
    assert dispatcher_text("deepep-normal", "node") == (
        "deepep-normal dispatcher, one copy per destination node"
    )


def test_port_chart_draws_sent_and_received_only_where_they_differ():
    import numpy as np

    from moesim.report.figures import port_bytes_svg

    sent = np.array([4e6, 2e6, 3e6])
    one = port_bytes_svg(sent, None)
    assert "sent = received" in one and ">received<" not in one.replace(" ", "")
    two = port_bytes_svg(sent, sent * 2)
    assert "sent = received" not in two and "received" in two
