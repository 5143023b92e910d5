import logging

from engine.progress import progress


def test_log_progress_counts_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="geoexplora.progress")
    items = list(progress(range(5), desc="work", interval=0.0))
    assert items == list(range(5))
    assert any("work: 5/5" in r.getMessage() for r in caplog.records)


def test_manual_update_and_disable(caplog):
    caplog.set_level(logging.INFO, logger="geoexplora.progress")
    with progress(total=3, desc="quiet", disable=True) as bar:
        bar.update(3)
    assert bar.n == 3
    assert not [r for r in caplog.records if "quiet" in r.getMessage()]


def test_log_lines_every_n_updates_with_elapsed_and_eta(caplog, monkeypatch):
    import engine.progress as mod

    clock = iter(range(0, 1000, 2))  # every monotonic() call advances 2 s
    monkeypatch.setattr(mod.time, "monotonic", lambda: float(next(clock)))
    caplog.set_level(logging.INFO, logger="geoexplora.progress")
    with progress(total=10, desc="train", unit="step", every=3, initial=4) as bar:  # resumed at 4
        for i in range(6):
            bar.set_postfix_str(f"loss {i}")
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[1].split()[0] for line in lines] == ["6/10", "9/10", "10/10"]
    # step 6: 2 steps done since the resume in 4 s -> 2.0 s/step, 4 steps left -> eta 8 s
    assert lines[0] == "train: 6/10 step (2.0 s/step, elapsed 0:00:04, eta 0:00:08) loss 1"
    assert lines[-1].endswith("eta 0:00:00) loss 5")
