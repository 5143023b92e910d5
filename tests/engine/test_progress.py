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
