"""Lines written to file descriptor 2 (by native code too) are filtered, the rest passed on."""

import os
import re

from dsl_fed.litert import DELEGATE_NOTICE
from dsl_fed.quiet import CHATTER, without_stderr_lines


def test_only_the_matching_lines_written_to_fd_2_are_dropped(capfd):
    with without_stderr_lines(re.compile("drop")):
        os.write(2, b"kept 1\nplease drop this\nkept 2\n")
    assert capfd.readouterr().err == "kept 1\nkept 2\n"


def test_tensorflow_chatter_and_litert_delegate_notice_are_recognised():
    assert CHATTER.search("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert CHATTER.search("I0000 00:00:1796424882.820301    9389 port.cc:153] oneDNN custom operations are on.")
    assert DELEGATE_NOTICE.search("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
    assert not CHATTER.search("dsl_fed train: error: cfg.yaml: config file not found")
    assert not DELEGATE_NOTICE.search("dsl_fed predict: error: m.tflite: model file not found")
