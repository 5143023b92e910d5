"""launchers/bench/harness.py: tables, the result file and its environment record, interleaved timing."""

import json
import re
import subprocess
import types
from pathlib import Path

import pytest
import torch

import kernels.measure
from engine.errors import UserError
from launchers.bench import harness
from launchers.bench.harness import Column

REPO = Path(__file__).resolve().parents[3]
ROWS = [
    {"provider": "torch", "layer": "fc1", "ms": 1.23456, "alloc_mb": None},
    {"provider": "reference", "layer": "fc1", "ms": 12.5, "alloc_mb": 3.0},
    {"provider": "peft", "layer": "qkv", "error": "ValueError: no slices"},
]
COLUMNS = [
    Column("provider", "provider", left=True),
    Column("layer", "layer", left=True),
    Column("ms", "ms", "{:.2f}"),
    Column("alloc MB", "alloc_mb", "{:.1f}"),
    Column("x2", lambda r: 2 * r["ms"] if "ms" in r else None, "{:.1f}x"),
    Column("graph", "graph_ms", optional=True),
]


def test_text_table_aligns_formats_and_shows_errors_after_the_lead_cells():
    lines = harness.format_table(ROWS, COLUMNS, lead=2).splitlines()
    assert lines[0].split() == ["provider", "layer", "ms", "alloc", "MB", "x2"]  # no row has a graph: left out
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2].split() == ["torch", "fc1", "1.23", "-", "2.5x"]
    assert lines[3].split() == ["reference", "fc1", "12.50", "3.0", "25.0x"]
    assert lines[4].split() == ["peft", "qkv", "n/a:", "ValueError:", "no", "slices"]
    assert lines[4].index("qkv") == lines[0].index("layer")
    # numbers right-aligned under their title: the cells end where the titles end
    assert lines[2].index("1.23") + 4 == lines[3].index("12.50") + 5 == lines[0].index("ms") + 2


def test_markdown_table_and_an_optional_column_that_has_values():
    rows = [{**ROWS[0], "graph_ms": 0.5}, ROWS[1]]
    lines = harness.format_table(rows, COLUMNS, markdown=True).splitlines()
    assert lines[0] == "| provider | layer | ms | alloc MB | x2 | graph |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|"
    assert lines[2] == "| torch | fc1 | 1.23 | - | 2.5x | 0.5 |"
    assert lines[3] == "| reference | fc1 | 12.50 | 3.0 | 25.0x | - |"


def test_baseline_ratios_match_the_same_case():
    base = harness.baseline_of(ROWS, "reference", ("layer",))
    assert harness.ratio(base(ROWS[0])["ms"], ROWS[0]["ms"]) == pytest.approx(12.5 / 1.23456)
    assert base(ROWS[2]) == {} and harness.ratio(None, 1.0) is None and harness.ratio(1.0, 0.0) is None


def test_result_file_carries_the_environment_record_and_settings(tmp_path):
    out = tmp_path / "sub" / "result.json"
    record = harness.start("demo", {"files": 3, "out": str(out)})
    result = harness.save(str(out), record, rows=[{"provider": "a", "ms": 1.0}], meta={"timing": "x"})
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result, default=str))
    assert written["benchmark"] == "demo" and written["settings"] == {"files": 3}
    assert written["rows"] == [{"provider": "a", "ms": 1.0}] and written["meta"] == {"timing": "x"}
    env = written["environment"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert env["cpu_count"] >= 1 and env["device"].startswith("cpu (")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    assert len(env["load_average"]) == len(env["load_average_end"]) == 3


def test_an_unwritable_out_is_refused_before_measuring(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--out"):
        harness.start("demo", {"out": str(tmp_path / "file" / "result.json")})


def test_rounds_call_providers_in_turn_and_drop_the_warmup_rounds():
    calls = []

    def provider(name):
        def run():
            calls.append(name)
            return len(calls)

        return run

    runs = harness.rounds({"a": provider("a"), "b": provider("b")}, repeat=2, warmup=1)
    assert calls == ["a", "b"] * 3
    assert runs == {"a": [3, 5], "b": [4, 6]}


def test_measure_providers_gives_interleaved_medians_per_provider(monkeypatch):
    """A fake clock that each provider advances by its own duration: 1 ms, and 3 ms with one 100 ms
    outlier among the timed calls (the median ignores it, a mean would not)."""
    clock = types.SimpleNamespace(now=0.0, order=[])
    monkeypatch.setattr(kernels.measure, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def build(name, durations):
        def forward():
            clock.now += next(durations) / 1e3
            clock.order.append(name)
            return torch.zeros(2)

        return lambda: (forward, [])

    # per provider: 1 error check + 1 warm-up + 1 memory call before the 5 timed ones
    def broken():
        raise RuntimeError("cannot run this case")

    slow = iter([3, 3, 3, 3, 100, 3, 3, 3])
    builders = {"fast": build("fast", iter([1] * 8)), "slow": build("slow", slow), "broken": broken}
    rows = harness.measure_providers(
        builders,
        {"case": "c"},
        mode="fwd",
        grad_out=torch.zeros(2),
        reference=torch.zeros(2),
        device="cpu",
        warmup=0,
        iters=5,
        flops=2e9,
    )
    by = {r["provider"]: r for r in rows}
    assert by["fast"]["ms"] == pytest.approx(1.0) and by["slow"]["ms"] == pytest.approx(3.0)
    assert by["fast"]["tflops"] == pytest.approx(2e9 / 1e-3 / 1e12)
    assert by["fast"]["max_abs_err"] == 0.0 and by["fast"]["case"] == "c" and "alloc_mb" in by["slow"]
    assert by["broken"]["error"] == "RuntimeError: cannot run this case" and "ms" not in by["broken"]
    # the timed calls alternate, the first provider of each round rotating
    assert clock.order[-10:] == ["fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]


def test_list_flags_refuse_bad_values_in_one_line():
    assert harness.comma_list("fwd, fwd_bwd", "--modes", ("fwd", "fwd_bwd")) == ["fwd", "fwd_bwd"]
    assert harness.comma_list("0,20", "--latency-ms", cast=float) == [0.0, 20.0]
    assert harness.comma_list("", "--memory-models", allow_empty=True) == []
    for text, kw in (("fwd,bwd", {"choices": ("fwd", "fwd_bwd")}), ("1,x", {"cast": int}), ("", {})):
        with pytest.raises(UserError, match="^--flag "):
            harness.comma_list(text, "--flag", **kw)
    assert harness.int_groups("1,2,3,4;5,6,7,8", "--shapes", 4, "") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    for text in ("1,2,3", "1,2,3,0", "a,b,c,d", ""):
        with pytest.raises(UserError, match="^--shapes "):
            harness.int_groups(text, "--shapes", 4, "1,2,3,4")
