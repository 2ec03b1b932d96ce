"""The CLI's error policy for a closed output pipe (``comtip checkpoints | head``)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from napari_comtip._cli_support import EXIT_BROKEN_PIPE, run_guarded


def test_broken_pipe_is_quiet_not_a_disk_error(capsys, monkeypatch):
    monkeypatch.delenv("COMTIP_DEBUG", raising=False)

    def handler(_args):
        raise BrokenPipeError(32, "Broken pipe")

    # under capsys sys.stdout has no file descriptor, so the real stdout is left alone
    status = run_guarded(handler, argparse.Namespace())
    assert status == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_listing_into_a_closed_pipe_prints_no_error():
    # the reader closes at once; whatever the timing, no "error:" line may reach stderr
    cmd = [sys.executable, "-m", "napari_comtip", "checkpoints"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "error" not in err.lower(), err
