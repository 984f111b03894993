"""Ctrl-C and SIGTERM in the command-line tools (`flux_flax.interrupts`), in this process: a
signal whose exception some code caught is raised again at the commit's point of no return, and a
signal inside the commit's renames leaves the new checkpoint in place and the old one nowhere."""

import contextlib
import json
import os
import signal
import sys
import weakref
from collections.abc import Callable

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


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, interrupts.Terminated)])
def test_a_signal_inside_a_weakref_callback_is_remembered_not_reported(signum, raised, monkeypatch):
    """A signal landing in a weakref callback (what CI's SIGTERM once hit: importlib's module cache
    clean-up) raises where Python can only report it to sys.unraisablehook, whose default prints
    "Exception ignored in" and a traceback under the command's one line: inside `raising()` it is
    not reported, and `check` still raises it; other unraisable exceptions still are; outside the
    block the hook is the previous one again."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    class Target:
        pass

    with interrupts.raising():
        target = Target()
        ref = weakref.ref(target, lambda _: signal.raise_signal(signum))
        del target  # the callback runs here; its handler's exception cannot leave it
        assert ref() is None
        with pytest.raises(raised):
            interrupts.check()
        other = Target()
        other_ref = weakref.ref(other, lambda _: 1 / 0)
        del other
        assert other_ref() is None
    assert [type(u.exc_value) for u in reported] == [ZeroDivisionError]
    assert sys.unraisablehook == reported.append


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


@pytest.mark.usefixtures("python_sigint_handler")
@pytest.mark.parametrize("inside_raising", [True, False])
def test_deferred_raises_a_signal_at_the_end_of_its_block(inside_raising):
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.raising() if inside_raising else contextlib.nullcontext():
            with interrupts.deferred():
                signal.raise_signal(signal.SIGINT)
                ran.append("rest of the block")
            ran.append("after the block")
    assert ran == ["rest of the block"]


def test_deferred_signal_is_not_lost_behind_the_blocks_exception():
    with interrupts.raising(), pytest.raises(KeyboardInterrupt) as info:
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            raise OSError("disk full")
    assert isinstance(info.value.__context__, OSError)


def test_deferred_signal_is_remembered_for_check():
    with interrupts.raising():
        with contextlib.suppress(KeyboardInterrupt):
            with interrupts.deferred():
                signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()


def _signal_once(signum: int, then: Callable) -> Callable:
    """`then`, preceded on its first call by the signal (as if it arrived just before)."""
    calls = []

    def wrapped(*args, **kwargs):
        if not calls:
            calls.append(1)
            signal.raise_signal(signum)
        return then(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, interrupts.Terminated)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_temporary_directory_is_made_leaves_nothing(monkeypatch, tmp_path, signum, raised):
    """The signal lands between the directory's creation and its owner record: the writer still
    removes it (the subprocess test's failure on CI: the signal came as the directory appeared)."""
    monkeypatch.setattr(checkpoint.socket, "gethostname", _signal_once(signum, checkpoint.socket.gethostname))
    with interrupts.raising(), pytest.raises(raised):
        with CheckpointWriter(tmp_path / "ckpt"):
            pytest.fail("the writer was entered despite the signal")
    assert list(tmp_path.iterdir()) == []


class _TrackedSave:
    """An Orbax save that records whether its write was waited for to the end; with
    `interrupt_first_wait`, a Ctrl-C arrives as the main thread starts waiting for it."""

    def __init__(self, response, interrupt_first_wait: bool):
        self.response, self.interrupt, self.ended = response, interrupt_first_wait, False

    def result(self):
        if self.interrupt:
            self.interrupt = False
            signal.raise_signal(signal.SIGINT)
        out = self.response.result()
        self.ended = True
        return out


@pytest.mark.parametrize("where", ["starting the write", "waiting for the write"])
def test_a_signal_during_a_background_write_leaves_nothing(monkeypatch, tmp_path, where):
    """Ctrl-C as a batch's background write starts, or while the next batch waits for it: the
    writer waits for that write to end before it removes the temporary directory, so no Orbax
    thread writes into a directory that is being removed."""
    save_async = checkpoint.ocp.partial.save_async
    responses = []

    def wrapped(*args, **kwargs):
        responses.append(_TrackedSave(save_async(*args, **kwargs), interrupt_first_wait=where == "waiting for the write"))
        if where == "starting the write":
            signal.raise_signal(signal.SIGINT)
        return responses[-1]

    monkeypatch.setattr(checkpoint.ocp.partial, "save_async", wrapped)
    with interrupts.raising(), pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "ckpt", flush_bytes=16) as writer:
            for i in range(3):
                writer.add((f"w{i}",), jnp.full((4,), i, jnp.float32))
            writer.commit({"value": 1.0})
    assert len(responses) == 1 and responses[0].ended
    assert list(tmp_path.iterdir()) == []


def test_a_block_inside_another_leaves_the_signal_to_the_outer_one():
    """abort's hold inside a deferred block, say: the signal is the outer block's to raise, once."""
    ran = []
    with interrupts.raising(), pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.held():
                signal.raise_signal(signal.SIGINT)
            ran.append("outer block went on")
    assert ran == ["outer block went on"]
