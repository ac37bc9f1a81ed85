"""The probe's own counting: saved tensors keyed when saved, unique storages, and the cheap host RSS read."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from blipmon.runner.probes import CountingSavedTensorTracker, HostRss, SavedTensorTracker, storage_bytes


def _forward(x: torch.Tensor, w: torch.nn.Parameter) -> torch.Tensor:
    h = x @ w  # saves x and w (a parameter: excluded)
    q, k = h.tanh(), h.sigmoid()  # both save their output... and nothing of h twice: unique storages
    return (q * k + h[:, :2].exp().sum()).sum()  # a view of h is saved through exp's input


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
    expected, _ = storage_bytes(plain.alive(), exclude=param_keys)
    got, on_cuda = fast.count(param_keys)
    assert got == expected > 0 and on_cuda == 0
    assert got == storage_bytes(fast.alive(), exclude=param_keys)[0]
    loss_fast.backward()
    loss_plain.backward()
    got_after, _ = fast.count(param_keys)
    assert got_after == storage_bytes(plain.alive(), exclude=param_keys)[0]
    assert got_after == (x.untyped_storage().nbytes() if checkpoint_input else 0)  # only the noted input lives on


def test_shared_storages_count_once() -> None:
    tracker = CountingSavedTensorTracker()
    base = torch.randn(100, requires_grad=True)
    a = base * 1  # one storage...
    with tracker.track():
        out = (a[:50].exp() + a[50:].exp()).sum()  # ... saved through two views (exp saves its result: two more)
    got, _ = tracker.count(set())
    views_storage = a.untyped_storage().nbytes()
    assert got == storage_bytes(tracker.alive())[0]
    assert got < views_storage * 3  # the two views of `a` did not count twice
    out.backward()


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
