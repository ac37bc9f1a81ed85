"""The probe's own counting: saved tensors keyed when saved, unique storages, and the cheap host RSS read."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from blipmon.runner.probes import CountingSavedTensorTracker, HostRss, SavedTensorTracker, storage_bytes


def _forward(x: torch.Tensor, w: torch.nn.Parameter) -> torch.Tensor:
    h = x @ w  # saves x and w (a parameter: excluded); h itself is saved by nothing below
    q, k = h.tanh(), h.sigmoid()  # each saves its output: q and k, the shape of h
    return (q * k + h[:, :2].exp().sum()).sum()  # q * k saves q and k again (same storages); exp saves its result


# Counted by hand from the shapes above (fp32, 4 bytes): x [8, 16], q [8, 16], k [8, 16], exp's result [8, 2].
# A count that took q and k twice (mul saves them again) would be 2624; one that kept w would be 2624 too.
SAVED_BYTES = (8 * 16 + 8 * 16 + 8 * 16 + 8 * 2) * 4


@pytest.mark.parametrize("checkpoint_input", [False, True])
def test_counting_tracker_equals_the_plain_count_and_frees_with_backward(checkpoint_input: bool) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(8, 16)
    param_keys = {((-1, w.untyped_storage().data_ptr()))}
    fast, plain = CountingSavedTensorTracker(), SavedTensorTracker()
    with fast.track():
        loss_fast = _forward(x, w)
    with plain.track():
        loss_plain = _forward(x, w)
    if checkpoint_input:
        fast.note(x)
        plain.note(x)
    assert SAVED_BYTES == 1600
    got, on_cuda = fast.count(param_keys)
    # The noted input is x, whose storage the matmul already saved: it counts once either way.
    assert got == SAVED_BYTES and on_cuda == 0
    # The plain tracker (the estimator's) agrees, and so does a count of what the fast one holds.
    assert storage_bytes(plain.alive(), exclude=param_keys) == (SAVED_BYTES, 0)
    assert storage_bytes(fast.alive(), exclude=param_keys) == (SAVED_BYTES, 0)
    loss_fast.backward()
    loss_plain.backward()
    got_after, _ = fast.count(param_keys)
    assert got_after == storage_bytes(plain.alive(), exclude=param_keys)[0]
    assert got_after == (x.untyped_storage().nbytes() if checkpoint_input else 0)  # only the noted input lives on


def test_shared_storages_count_once() -> None:
    tracker = CountingSavedTensorTracker()
    base = torch.randn(100, requires_grad=True)
    a = base * 1  # one storage of 100 fp32: 400 B...
    with tracker.track():
        out = (a[:50].sin() + a[50:].sin()).sum()  # ... saved through two views (sin saves its input)
    views = [t.untyped_storage().nbytes() for t in tracker.alive()]
    assert views == [400, 400]  # two views, each of the one storage of `a`
    got, on_cuda = tracker.count(set())
    assert (got, on_cuda) == (100 * 4, 0)  # once: counting per view would give 800
    out.backward()
    assert tracker.count(set()) == (0, 0)  # backward released both


def test_host_rss_reads_what_psutil_reads() -> None:
    rss = HostRss()
    before = rss()
    block = bytearray(64 * 1024 * 1024)  # touched: resident
    during = rss()
    assert during - before >= 60 * 1024 * 1024
    assert abs(during - psutil.Process().memory_info().rss) < 8 * 1024 * 1024
    del block


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_host_rss_follows_a_forked_child() -> None:
    """/proc/<pid>/statm was opened by the parent: a child must read its own, not its parent's."""
    rss = HostRss()
    rss()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: grow, and report whether the reading saw it
        try:
            before = rss()
            block = bytearray(128 * 1024 * 1024)
            grew = rss() - before >= 120 * 1024 * 1024
            os.write(w, b"1" if grew and block else b"0")
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_an_unreadable_saved_tensor_fails_at_the_boundary_not_in_the_forward() -> None:
    tracker = CountingSavedTensorTracker()
    dense = torch.randn(4, 4, requires_grad=True)
    sparse = torch.eye(4).to_sparse()
    with tracker.track():
        out = torch.sparse.mm(sparse, dense).sum()  # saves the sparse operand: it has no plain storage
    out.backward()  # the step itself went on
    with pytest.raises(RuntimeError, match="cannot read the storage"):
        tracker.count(set())


def test_host_rss_can_be_closed_and_read_again() -> None:
    rss = HostRss()
    first = rss()
    rss.close()
    assert rss._fd is None
    assert abs(rss() - first) < 64 * 1024 * 1024  # reopened on demand
    rss.close()
