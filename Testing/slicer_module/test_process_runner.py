"""The background-process runner: progress protocol parsing, results, errors, cancelling the tree.

Real child processes throughout (small Python scripts, and the real ``srcsm`` command for the
protocol); nothing is mocked.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from SRCSMSegmenterLib.process_runner import ProcessRunner, ProcessStartError, parse_event

POSIX = sys.platform != "win32"


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def _collect(runner: ProcessRunner) -> list[tuple]:
    events: list[tuple] = []
    runner.started.connect(lambda pid: events.append(("started", pid)))
    runner.progress.connect(lambda f, m: events.append(("progress", f, m)))
    runner.message.connect(lambda level, text: events.append(("message", level, text)))
    runner.output.connect(lambda line: events.append(("output", line)))
    runner.finished.connect(lambda result: events.append(("finished", result)))
    return events


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (a zombie has exited; only its entry is left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_parse_event_accepts_only_protocol_objects():
    assert parse_event('{"event": "progress", "fraction": 0.5, "message": "x"}')["fraction"] == 0.5
    assert parse_event('  {"event": "done", "output": "/a"}  \n')["output"] == "/a"
    assert parse_event('{"event": "unknown"}') is None
    assert parse_event('{"fraction": 1}') is None
    assert parse_event("Traceback (most recent call last):") is None
    assert parse_event("{not json}") is None
    assert parse_event("[1, 2]") is None


def test_progress_messages_and_done_are_delivered_in_order(tmp_path):
    cmd = _script(tmp_path, """
        import json, sys
        def emit(**o): sys.stderr.write(json.dumps(o) + "\\n"); sys.stderr.flush()
        emit(event="progress", fraction=0.1, message="Reading the input")
        print("a line on stdout")
        sys.stderr.write("UserWarning: a library warning\\n")
        emit(event="message", level="warning", message="GPU not found; using the CPU")
        emit(event="progress", fraction=0.9, message="Segmenting (window 3/3)")
        emit(event="done", output="/tmp/x.seg.nrrd", seconds=1.5)
    """)
    runner = ProcessRunner()
    events = _collect(runner)
    pid = runner.start(cmd)
    result = runner.wait(timeout=60)
    assert result.status == "succeeded" and result.succeeded and result.returncode == 0
    assert result.done == {"output": "/tmp/x.seg.nrrd", "seconds": 1.5}
    assert events[0] == ("started", pid)
    assert [e for e in events if e[0] == "progress"] == [
        ("progress", 0.1, "Reading the input"), ("progress", 0.9, "Segmenting (window 3/3)")]
    assert ("message", "warning", "GPU not found; using the CPU") in events
    assert events[-1] == ("finished", result)
    assert sum(e[0] == "finished" for e in events) == 1
    # non-protocol output is kept as details (stdout and stderr)
    assert "UserWarning: a library warning" in result.details and "a line on stdout" in result.details
    assert not runner.running and runner.result is result


def test_error_event_gives_readable_message_and_details(tmp_path):
    cmd = _script(tmp_path, """
        import json, sys
        sys.stderr.write("some log line\\n")
        sys.stderr.write(json.dumps({"event": "error", "type": "ValueError",
                         "message": "Unexpected error: ValueError('boom'). Please report it with this trace:\\n"
                                    "Traceback (most recent call last):\\n  File x\\nValueError: boom"}) + "\\n")
        sys.exit(1)
    """)
    runner = ProcessRunner()
    events = _collect(runner)
    runner.start(cmd)
    result = runner.wait(timeout=60)
    assert result.status == "failed" and result.returncode == 1
    assert result.message == "Unexpected error: ValueError('boom'). Please report it with this trace:"
    assert result.error_type == "ValueError"
    assert "Traceback (most recent call last):" in result.details and "some log line" in result.details
    assert any(e[0] == "message" and e[1] == "error" for e in events)


def test_crash_without_error_event_is_explained(tmp_path):
    cmd = _script(tmp_path, """
        import sys
        sys.stderr.write("ModuleNotFoundError: No module named 'monai'\\n")
        sys.exit(3)
    """)
    runner = ProcessRunner()
    runner.start(cmd)
    result = runner.wait(timeout=60)
    assert result.status == "failed" and result.returncode == 3
    assert "exit code 3" in result.message and "missing Python package" in result.message
    assert "No module named 'monai'" in result.details


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
def test_killed_by_a_signal_is_explained(tmp_path):
    cmd = _script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    runner = ProcessRunner()
    runner.start(cmd)
    result = runner.wait(timeout=60)
    assert result.status == "failed" and result.returncode < 0
    assert "SIGKILL" in result.message and "memory" in result.message


def test_start_failure_is_a_clear_error(tmp_path):
    runner = ProcessRunner()
    with pytest.raises(ProcessStartError, match="Could not start the background process"):
        runner.start([str(tmp_path / "no-such-python"), "-c", "pass"])
    assert not runner.running


def test_a_runner_is_single_use(tmp_path):
    runner = ProcessRunner()
    runner.start([sys.executable, "-c", "pass"])
    runner.wait(timeout=60)
    with pytest.raises(RuntimeError, match="one process"):
        runner.start([sys.executable, "-c", "pass"])


@pytest.mark.skipif(not POSIX, reason="process groups and /proc are POSIX; Windows uses taskkill /T")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    """The child starts a grandchild that IGNORES SIGTERM; cancel must still leave neither alive."""
    cmd = _script(tmp_path, """
        import json, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        sys.stderr.write(json.dumps({"event": "message", "level": "info",
                                     "message": f"grandchild {grandchild.pid}"}) + "\\n")
        sys.stderr.flush()
        time.sleep(120)
    """)
    runner = ProcessRunner(grace_seconds=0.5)
    messages: list[str] = []
    runner.message.connect(lambda level, text: messages.append(text))
    child = runner.start(cmd)
    deadline = time.monotonic() + 30
    while not messages and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.05)
    assert messages, "the child never reported its grandchild"
    grandchild = int(messages[0].split()[-1])
    assert _alive(child) and _alive(grandchild)

    t0 = time.monotonic()
    runner.cancel()
    result = runner.wait(timeout=30)
    assert result.status == "cancelled" and result.message == "Cancelled by the user."
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child survived cancel"
    assert not _alive(grandchild), "the grandchild (which ignores SIGTERM) survived cancel"
    assert time.monotonic() - t0 < 15


def test_cancel_before_or_after_the_end_is_harmless(tmp_path):
    runner = ProcessRunner()
    runner.cancel()  # not started: nothing to do
    runner.start([sys.executable, "-c", "pass"])
    result = runner.wait(timeout=60)
    runner.cancel()  # already finished
    assert result.status == "succeeded"


def test_real_srcsm_error_goes_through_the_protocol(tmp_path, module_model):
    """The real `srcsm segment … --progress json` reports a bad input as a protocol error event."""
    cmd = [sys.executable, "-m", "SRCSMSegmenterLib.cli", "segment", str(tmp_path / "missing.nii.gz"),
           str(tmp_path / "out.seg.nrrd"), "--model", str(module_model), "--progress", "json"]
    runner = ProcessRunner()
    runner.start(cmd)
    result = runner.wait(timeout=120)
    assert result.status == "failed" and result.returncode == 2
    assert result.error_type == "InputError"
    assert "Input not found" in result.message and "missing.nii.gz" in result.message
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_wait_timeout_leaves_the_job_running_until_cancelled(tmp_path):
    runner = ProcessRunner(grace_seconds=0.2)
    runner.start([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(TimeoutError):
        runner.wait(timeout=0.3)
    assert runner.running
    runner.cancel()
    assert runner.wait(timeout=30).status == "cancelled"

