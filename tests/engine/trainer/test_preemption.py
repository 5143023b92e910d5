import os
import signal

import pytest

from engine.trainer.preemption import PreemptionGuard, stop_exit_code


def test_sigterm_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM" and guard.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert (stop_exit_code(None), stop_exit_code("SIGTERM"), stop_exit_code("SIGINT")) == (0, 143, 130)


def test_second_ctrl_c_interrupts_at_once():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_child_exit_handler_is_off_after_a_stop_request():
    def torch_like(signum, frame):
        raise RuntimeError("DataLoader worker killed")

    before = signal.signal(signal.SIGCHLD, torch_like)
    try:
        with PreemptionGuard():
            assert signal.getsignal(signal.SIGCHLD) is torch_like
            os.kill(os.getpid(), signal.SIGTERM)
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGCHLD)  # a worker dying now does not interrupt the save
        assert signal.getsignal(signal.SIGCHLD) is torch_like
    finally:
        signal.signal(signal.SIGCHLD, before)
