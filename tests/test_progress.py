"""Progress bars appear on a real terminal (a pseudo-terminal here) and stay out of files and pipes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import select
import struct
import termios
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ignite.handlers import ProgressBar
from monai.bundle import ConfigWorkflow

from vessa_components.metrics import evaluate_folders
from vessa_components.utils import progress_bar, show_progress

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "vessa_ssl_acdc" / "configs"


@pytest.fixture
def terminal():
    """The two ends of a pseudo-terminal: a writable stream that is a TTY, and a reader of what reached it."""
    master, slave = pty.openpty()
    # a fresh pseudo-terminal is 0 columns wide, in which tqdm draws nothing: give it a usual window size
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    stream = os.fdopen(slave, "w", buffering=1)

    def read() -> str:
        stream.flush()
        chunks = []
        while select.select([master], [], [], 0.2)[0]:
            chunks.append(os.read(master, 65536))
        return b"".join(chunks).decode(errors="replace")

    yield stream, read
    stream.close()
    os.close(master)


def test_switch_follows_the_stream(tmp_path, terminal):
    tty, read = terminal
    assert show_progress(tty)
    with open(tmp_path / "log.txt", "w") as log:
        assert not show_progress(log)
        for _ in progress_bar(range(5), file=log, desc="in a log"):
            pass
    assert (tmp_path / "log.txt").read_text() == ""  # nothing written to the log
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        assert not show_progress(pipe)
    os.close(read_end)
    closed = io.StringIO()
    closed.close()
    assert not show_progress(closed)

    for _ in progress_bar(range(5), file=tty, desc="in a terminal"):
        pass
    assert "in a terminal" in read() and not show_progress(io.StringIO())
    # an explicit choice wins over the detection
    for _ in progress_bar(range(5), enabled=False, file=tty):
        pass
    assert read() == ""


def test_long_command_draws_on_stderr_only_in_a_terminal(tmp_path, terminal):
    """evaluate_folders (tools/evaluate.py) with the default progress=None: a bar when stderr is a terminal,
    nothing when it is redirected."""
    tty, read = terminal
    for folder in ("pred", "label"):
        (tmp_path / folder).mkdir()
        for name in ("a", "b"):
            label = np.zeros((8, 8, 3), dtype=np.uint8)
            label[2:6, 2:6] = 1
            nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / folder / f"{name}.nii.gz")
    with contextlib.redirect_stderr(tty):
        evaluate_folders(tmp_path / "pred", tmp_path / "label", ["background", "lv"])
    drawn = read()
    assert "scoring volumes" in drawn and "2/2" in drawn
    redirected = io.StringIO()
    with contextlib.redirect_stderr(redirected):
        results = evaluate_folders(tmp_path / "pred", tmp_path / "label", ["background", "lv"])
    assert redirected.getvalue() == "" and results["a"]["lv"]["dice"] == 1.0


@pytest.mark.parametrize("show", [True, False])
def test_evaluate_json_progress_switch(tmp_path, show):
    """evaluate.json's evaluator gets Ignite's ProgressBar exactly when show_progress is true."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], workflow_type="eval",
        bundle_root=str(CONFIGS.parent), output_dir=str(tmp_path), show_progress=show,
    )
    handlers = workflow.parser.get_parsed_content("validate#handlers")
    assert any(isinstance(h, ProgressBar) for h in handlers) == show
