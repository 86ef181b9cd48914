"""StopRequest: a signal only asks for a stop; a second Ctrl-C stops at once; handlers are restored."""
import os
import signal

import pytest

from resnet.interrupt import StopRequest


def test_first_signal_requests_a_stop_second_ctrl_c_interrupts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"  # no exception: the step can finish
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
