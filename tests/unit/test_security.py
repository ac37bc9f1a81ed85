"""A profile and a configuration are data: nothing read from them is executed, unpickled or used as a path.

Each test would fail if its protection went away: a profile whose fields are Python code, a pickle
dropped into a run directory, a run name that climbs out of the profiles folder, a secret in the
environment, a shell string where an argument list belongs.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import blipmon
from blipmon.cli import main as cli_main
from blipmon.core.config import ConfigError, resolve
from blipmon.core.profile import write_config
from blipmon.core.run import load_run
from blipmon.runner.launch import Launch, make_run_dir, run_dir_name

SOURCE = Path(blipmon.__file__).parent


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    return [(ast.unparse(n.func), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_eval_exec_pickle_or_shell_anywhere_in_blipmon() -> None:
    offenders = []
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for n in names):
                    offenders.append(f"{path}: imports {names}")
        for _name, call in _calls(tree):
            func = ast.unparse(call.func)
            if func in ("eval", "exec", "builtins.eval", "builtins.exec", "os.system", "os.popen"):
                offenders.append(f"{path}:{call.lineno}: {func}()")
            for kw in call.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    offenders.append(f"{path}:{call.lineno}: shell={ast.unparse(kw.value)}")
    assert not offenders, "\n".join(sorted(set(offenders)))


def _malicious_run(root: Path, canary: Path) -> Path:
    run = root / "evil-run"
    run.mkdir()
    code = f"__import__('os').system('touch {canary}')"
    events = [
        {"type": "header", "format_version": 1, "name": code, "pid": 1, "hostname": code},
        {"type": "config", "config": {"name": code, "model": {"id": code}, "train": {"batch_size": code}}},
        {"type": "environment", "device": code, "gpu_name": code, "torch": {"__reduce__": code}},
        {"type": "phase", "phase": "before_fwd", "step": code, "micro_step": 0, "params": code, "grads": [code]},
        {"type": "step", "step": 0, "seconds": code, "loss": code},
        {"type": "sample", "t": code, "rss": code},
        {"type": "oom", "step": code, "phase": code, "requested_bytes": code, "message": code},
        {"type": code},
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "config.json").write_text(json.dumps({"name": code, "!!python/object": code}))
    # A pickle that would create the canary if anything unpickled it.
    (run / "state.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR.")
    return run


def test_a_malicious_profile_is_only_ever_read_as_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    canary = tmp_path / "pwned"
    run = _malicious_run(tmp_path, canary)
    data = load_run(run)
    data.summary()
    for argv in (["show", str(run)], ["show", str(run), "--json"], ["compare", str(run), str(run), "--format", "csv"]):
        code = cli_main(argv)
        assert code in (0, 2)
    assert not canary.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_a_config_with_code_in_it_is_rejected_not_run(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    toml = tmp_path / "evil.toml"
    toml.write_text(f"name = \"x\"\n[train]\nbatch_size = \"__import__('os').system('touch {canary}')\"\n")
    with pytest.raises(ConfigError, match="train.batch_size"):
        resolve(str(toml))
    assert not canary.exists()


@pytest.mark.parametrize("name", ["../../escape", "/etc/passwd", "a/../../b", "..", "tiny/../../../x"])
def test_a_run_name_cannot_leave_the_profiles_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        resolve("tiny/blip2-opt", [f"name={json.dumps(name)}"])
    # Even a name that got past validation is flattened into one folder inside --out.
    cfg = resolve("tiny/blip2-opt")
    cfg["name"] = name
    flat = run_dir_name(cfg)
    assert "/" not in flat and "\\" not in flat and flat not in (".", "..")
    run_dir = make_run_dir(cfg, tmp_path / "profiles")
    assert run_dir.resolve().parent == (tmp_path / "profiles").resolve()


def test_children_are_started_with_an_argument_list(tmp_path: Path) -> None:
    cfg = resolve("tiny/blip2-opt")
    launch = Launch(cfg, tmp_path)
    cmd = launch.command()
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd)
    assert cmd[-1] == str(launch.run_dir)
    ddp = Launch(resolve("tiny/blip2-opt", ["train.devices=2", "train.strategy=ddp"]), tmp_path).command()
    assert "torch.distributed.run" in ddp and isinstance(ddp, list)


def test_trust_remote_code_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Blip2ForConditionalGeneration

    from blipmon.runner import models

    seen: list[object] = []
    real = Blip2ForConditionalGeneration.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls: type, *args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "from_pretrained", classmethod(spy))
    models.load_model(resolve("tiny/blip2-opt", ["job.kind=load"]), cuda=False)
    models.load_model(resolve("tiny/blip2-opt", ["job.kind=load", "model.trust_remote_code=true"]), cuda=False)
    assert seen == [False, True]


def test_no_secrets_reach_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blipmon.runner.child import record

    secret = "hf_SECRETtoken123456789"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, secret)
    cfg = resolve("tiny/blip2-opt", ["train.num_train_samples=8", "train.max_epochs=1", "runtime.sample_hz=2"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    assert record(cfg, run_dir) == 0
    for f in run_dir.iterdir():
        assert secret not in f.read_text(errors="replace"), f.name
    env = load_run(run_dir).environment
    assert not any("TOKEN" in k or "KEY" in k for k in env)
    assert os.environ["HF_TOKEN"] == secret  # the test really had it set
