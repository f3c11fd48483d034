"""The step benchmark (masked_optim/experiments/benchmark.py, benchmarks/bench_step.py): what it
times and reports. Timings themselves are never asserted; the report's structure is."""

from __future__ import annotations

import json

import pytest

from masked_optim.backends import _cpp_lib
from masked_optim.experiments import benchmark


def _run(tmp_path, *extra, name="b.json"):
    out = tmp_path / name
    assert benchmark.main(["--sizes", "0.05", "--repeats", "2", "--warmup", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_every_mode_is_timed_interleaved_against_both_sgd_loops(tmp_path, capsys):
    report = _run(tmp_path)
    printed = capsys.readouterr().out
    assert report["schema"] == "masked_optim.bench_step/2" and report["args"]["repeats"] == 2
    rows = {r["provider"]: r for r in report["results"] if r["kind"] != "split"}
    for name in (benchmark.BASELINE, benchmark.LOOP, benchmark.SUMSQ):
        assert len(rows[name]["times_s"]) == 2
    assert rows[benchmark.BASELINE]["ratio_to_sgd_foreach"] == 1.0
    assert rows[benchmark.LOOP]["ratio_to_sgd_loop"] == 1.0
    steps = {(r["mode"], r["granularity"]) for r in report["results"] if r["kind"] == "step"}
    splits = {(r["mode"], r["granularity"]) for r in report["results"] if r["kind"] == "split"}
    if _cpp_lib.available():
        expected = {("scale", "element")} | {(m, g) for m in ("uniform", "amss", "amss+") for g in ("element", "channel")}
        assert steps == expected and splits == expected
        for r in report["results"]:
            if r["kind"] == "split":
                assert r["stage1_ms"] > 0 and r["stage1_over_sumsq"] > 0
        assert "where the time goes" in printed and "masked cpp (amss+, element)" in printed
    else:
        assert steps == set() and "cpp: not timed" in printed
    for r in report["results"]:
        if "times_s" in r:
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]


def test_the_reference_is_timed_on_request(tmp_path):
    report = _run(tmp_path, "--reference", "--modes", "amss+", "--granularities", "channel")
    names = [r["provider"] for r in report["results"]]
    assert "masked reference (amss+, channel)" in names
    assert not any(n.startswith("stage 1 of masked reference") for n in names)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "amss++"], "Invalid --modes entry: 'amss++'"),
        (["--granularities", "row"], "Invalid --granularities entry: 'row'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--rate", "1.5"], "--rate must be in (0, 1], got 1.5"),
        (["--device", "tpu"], "--device must be cpu, or cuda where a GPU is visible; got 'tpu'"),
    ],
)
def test_bad_arguments_are_refused_by_name(args, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--sizes", "0.01", *args])
    assert message in capsys.readouterr().err


def test_several_runs_are_summarised_with_their_spread(tmp_path, capsys):
    a = _run(tmp_path, "--modes", "scale", name="a.json")
    b = _run(tmp_path, "--modes", "scale", name="b.json")
    rows = benchmark.summarize_runs([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    loop = next(r for r in rows if r["provider"] == benchmark.LOOP)
    ratios = [run["results"][1]["ratio_to_sgd_foreach"] for run in (a, b)]
    assert loop["ratios"] == ratios and loop["min_ratio"] == min(ratios) and loop["max_ratio"] == max(ratios)
    assert benchmark.summary_main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "median [min, max]" in capsys.readouterr().out
    c = _run(tmp_path, "--modes", "amss", name="c.json")
    assert c["args"]["modes"] == "amss"
    with pytest.raises(ValueError, match=r"Invalid file .*c\.json.*: other arguments or machine"):
        benchmark.summarize_runs([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    with pytest.raises(ValueError, match="two or more JSON files"):
        benchmark.summarize_runs([str(tmp_path / "a.json")])
    # The same model name on another CPU generation (a VM moved to another host) is another machine.
    assert a["machine"]["cpu_family"] == b["machine"]["cpu_family"]
    b["machine"]["cpu_family"] = "other"
    (tmp_path / "b2.json").write_text(json.dumps(b))
    with pytest.raises(ValueError, match=r"Invalid file .*b2\.json.*: other arguments or machine"):
        benchmark.summarize_runs([str(tmp_path / "a.json"), str(tmp_path / "b2.json")])
