"""Ctrl-C and SIGTERM in the command-line tools (`flux_flax.interrupts`), in this process: a
signal whose exception some code caught is raised again at the commit's point of no return, and a
signal inside the commit's renames leaves the new checkpoint in place and the old one nowhere."""

import contextlib
import json
import os
import signal

import jax.numpy as jnp
import pytest

from flux_flax import checkpoint, interrupts
from flux_flax.checkpoint import ORBAX_METADATA, CheckpointWriter, checkpoint_metadata
from flux_flax.config import FluxConfig


def _swallowed(signum: int) -> None:
    """The signal arrives; its exception is caught, as a library's event loop or pool might."""
    try:
        signal.raise_signal(signum)
    except (KeyboardInterrupt, interrupts.Terminated):
        pass


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, interrupts.Terminated)])
def test_a_caught_signal_is_raised_again_by_check(signum, raised):
    previous = signal.getsignal(signum)
    with interrupts.raising():
        interrupts.check()  # nothing yet
        _swallowed(signum)
        with pytest.raises(raised):
            interrupts.check()
    interrupts.check()  # forgotten with the block; the handler it replaced is back
    assert signal.getsignal(signum) is previous


def test_a_caught_ctrl_c_stops_the_commit_before_anything_is_at_the_path(tmp_path):
    out = tmp_path / "ckpt"
    with interrupts.raising(), pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out) as writer:
            writer.add(("w",), jnp.ones((4,), jnp.float32))
            _swallowed(signal.SIGINT)
            writer.commit({"value": 1.0})
    assert not out.exists() and list(tmp_path.iterdir()) == []


class _RenameThenSignal:
    """`os` for flux_flax.checkpoint whose first rename is followed by a Ctrl-C."""

    def __init__(self):
        self.renames = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst):
        os.rename(src, dst)
        self.renames += 1
        if self.renames == 1:
            signal.raise_signal(signal.SIGINT)


def _stored_value(path) -> float:
    return json.loads((path / ORBAX_METADATA).read_text())["custom_metadata"]["source"]["value"]


@pytest.mark.parametrize("inside_raising", [True, False])
def test_a_signal_between_the_renames_lets_them_finish(monkeypatch, tmp_path, inside_raising):
    """Ctrl-C after the old checkpoint was moved aside, before the new one is renamed in: the new
    one is at the path, nothing else is left, and the signal is dropped (too late to stop it);
    without the hold the old one would be removed with the temporary directory and neither left."""
    out = tmp_path / "ckpt"
    for value in (1.0, 2.0):
        with CheckpointWriter(out, overwrite=True) as writer:
            writer.add(("w",), jnp.full((4,), value, jnp.float32))
            if value == 2.0:
                fake = _RenameThenSignal()
                monkeypatch.setattr(checkpoint, "os", fake)
            with interrupts.raising() if inside_raising else contextlib.nullcontext():
                writer.commit(checkpoint_metadata(FluxConfig.tiny(), None, {"value": value}))
    assert fake.renames == 2 and _stored_value(out) == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
