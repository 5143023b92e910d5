"""engine.trainer.supervise with stand-in launchers and ranks (plain Python, no torch: seconds).

The stand-in launcher behaves like deepspeed's single-node runner (no signal handler, its children's
first non-zero code) or dies at once leaving its ranks orphaned; the stand-in ranks register with
the supervisor, take ``delay`` seconds to "checkpoint" after SIGTERM, report and exit 128 + 15.
The real launchers are in test_preemption_launchers.py.
"""

import signal
import sys
import textwrap
import time

from tests.faults.conftest import kill_group, run_cli, start_cli, wait_for

RANK = textwrap.dedent("""
    import os, signal, sys, time
    from engine.trainer.supervise import register_rank, report_exit
    out, delay, wait = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "wait"
    register_rank()
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    open(os.path.join(out, "ready-%s" % os.environ["LOCAL_RANK"]), "w").close()
    deadline = time.time() + 60
    while wait and not stop and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)  # the checkpoint
    code = 128 + stop[0] if stop else 0
    open(os.path.join(out, "done-%s" % os.environ["LOCAL_RANK"]), "w").close()
    report_exit(code)
    sys.exit(code)
""")

LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys
    rank, out, delay, mode = sys.argv[1:5]
    procs = [subprocess.Popen([sys.executable, rank, out, delay, "nowait" if mode == "orphan" else "wait"],
                              env=dict(os.environ, LOCAL_RANK=str(i))) for i in range(2)]
    if mode == "orphan":
        sys.exit(0)  # the launcher is gone; its ranks go on
    codes = [p.wait() for p in procs]
    sys.exit(next((c for c in codes if c), 0))
""")


def _scripts(tmp_path):
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    return [
        "-m",
        "engine.trainer.supervise",
        sys.executable,
        str(tmp_path / "launcher.py"),
        str(tmp_path / "rank.py"),
        str(tmp_path),
    ]


def test_sigterm_to_the_supervisor_alone_reaches_the_ranks_and_waits_for_them(tmp_path):
    """Kubernetes signals only PID 1, SLURM's --signal=B: only the batch shell: the supervisor passes
    the signal on to the ranks and exits with their code once they are done."""
    log = tmp_path / "sup.log"
    proc = start_cli([*_scripts(tmp_path), "1.0", "signal"], log)
    try:
        wait_for("both ranks ready", lambda: all((tmp_path / f"ready-{i}").exists() for i in (0, 1)), proc, 60, log)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        waited = time.monotonic() - t0
        done = all((tmp_path / f"done-{i}").exists() for i in (0, 1))
    finally:
        kill_group(proc)
    assert rc == 143 and done and waited >= 1.0, log.read_text()
    assert "passing it to rank pid(s)" in log.read_text()


def test_ranks_orphaned_by_the_launcher_are_waited_for(tmp_path):
    """The launcher dies while its ranks still write (the deepspeed runner on kill -TERM -<pgid>):
    the supervisor, their subreaper, exits only after them, with the code they reported."""
    res = run_cli([*_scripts(tmp_path), "1.0", "orphan"], timeout=60)
    assert res.rc == 0, res.tail()
    assert all((tmp_path / f"done-{i}").exists() for i in (0, 1))


def test_exit_code_without_a_report():
    """A command that reports nothing: its own code, 128 + N when signal N ended it."""
    sup = ["-m", "engine.trainer.supervise", "--grace", "5", "--", sys.executable, "-c"]
    assert run_cli([*sup, "raise SystemExit(3)"], timeout=60).rc == 3
    assert run_cli([*sup, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], timeout=60).rc == 143
    bad = run_cli(["-m", "engine.trainer.supervise", "--grace", "soon", "true"], timeout=60)
    assert bad.rc == 2 and bad.errors == ["error: --grace: expected seconds, got 'soon'"], bad.tail()
