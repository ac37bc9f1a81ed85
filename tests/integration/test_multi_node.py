"""Several machines: every node runs ``blipmon run`` with ``NODE_RANK`` set and writes its own run.

Two "nodes" on this machine (two ``blipmon run`` processes, one rank each, gloo, static rendezvous
at 127.0.0.1) train one DDP job together into a shared folder; each node's run reads as a run of
its own (config, plan, steps, its ranks' phases), and ``compare`` puts them side by side.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import PATIENCE_S, subprocess_env

from blipmon.core.run import RunData, load_run

pytestmark = pytest.mark.slow

JOB = ["train.num_nodes=2", "train.devices=1", "train.strategy=ddp", "train.num_train_samples=16",
       "train.batch_size=4", "train.max_epochs=1", "runtime.sample_hz=2"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def blipmon_run(shared: Path, cache: Path, node: int | None, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--out", str(shared)]
    for s in JOB:
        cmd += ["--set", s]
    extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if node is not None:
        extra["NODE_RANK"] = str(node)
    env = subprocess_env(cache, **extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def node_runs(tmp_path_factory: pytest.TempPathFactory, blipmon_cache: Path) -> list[RunData]:
    # An empty model cache on purpose: both nodes build the tiny model at once. Once torch.distributed is up,
    # transformers saves on global rank 0 only, so node 1 once renamed an empty folder into the cache.
    shared = tmp_path_factory.mktemp("shared")
    port = free_port()
    procs = [blipmon_run(shared, blipmon_cache, node, port) for node in (0, 1)]
    outs = [p.communicate(timeout=PATIENCE_S) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [load_run(Path(out.strip().splitlines()[-1])) for out, _err in outs]


def test_each_node_writes_its_own_run_named_after_the_node(node_runs: list[RunData]) -> None:
    assert [r.path.name.endswith(f"-node{i}") for i, r in enumerate(node_runs)] == [True, True]
    for i, run in enumerate(node_runs):
        assert run.status == "ok"
        assert run.header["world_size"] == 2 and run.header["node_rank"] == i
        assert {p["rank"] for p in run.phases} == {i}  # global rank: node 1's only rank is rank 1
        # 16 samples over 2 ranks in batches of 4: two optimizer steps on every node.
        assert [s["step"] for s in run.steps] == [0, 1]
        assert run.plan["world_size"] == 2


def test_compare_puts_the_nodes_side_by_side(node_runs: list[RunData]) -> None:
    from blipmon.core.report import render_compare

    table = render_compare(node_runs, "csv")
    assert table.splitlines()[0].count("tiny/blip2-opt") == 2
    assert "status,ok,ok" in table


def test_a_node_without_node_rank_or_master_addr_is_refused_before_loading(tmp_path: Path, blipmon_cache: Path) -> None:
    cmd = [sys.executable, "-m", "blipmon", "run", "tiny/blip2-opt", "--out", str(tmp_path / "o")]
    for s in JOB:
        cmd += ["--set", s]
    env = subprocess_env(blipmon_cache, NODE_RANK="5", MASTER_ADDR="127.0.0.1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "NODE_RANK" in res.stderr and "Traceback" not in res.stderr
    env = subprocess_env(blipmon_cache, NODE_RANK="0")
    env.pop("MASTER_ADDR", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "MASTER_ADDR" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
