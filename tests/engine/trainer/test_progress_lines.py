"""Without a TTY (SLURM, nohup), the trainer logs one progress line per ``train.log_every`` steps with
the step, rate, elapsed time, ETA and the step's metrics; a resumed run counts from its start step."""

import logging
import re

from engine.trainer.loop import Trainer
from tests.engine.trainer.test_loop import Stream, ToyObjective, _cfg

LINE = re.compile(
    r"^train: (\d+)/(\d+) step \(.+ (step/s|s/step), elapsed \d+:\d\d:\d\d, eta \d+:\d\d:\d\d\) "
    r"loss \S+ lr \S+"
)


def test_progress_lines_follow_log_every(single_rank_env, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="geoexplora.progress")
    Trainer(
        _cfg(tmp_path, "--train.max_steps", "5", "--train.log_every", "2", "--train.save_every", "4"),
        ToyObjective(),
        Stream(),
        single_rank_env,
    ).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "geoexplora.progress"]
    assert all(LINE.match(line) for line in lines), lines
    assert [int(LINE.match(line).group(1)) for line in lines] == [2, 4, 5]
    caplog.clear()
    Trainer(
        _cfg(tmp_path, "--train.max_steps", "8", "--train.log_every", "2"), ToyObjective(), Stream(), single_rank_env
    ).fit()  # resumes from the step-5 checkpoint
    lines = [r.getMessage() for r in caplog.records if r.name == "geoexplora.progress"]
    assert [LINE.match(line).group(1, 2) for line in lines] == [("6", "8"), ("8", "8")]
