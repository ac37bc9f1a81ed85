"""A ``"disk"`` placement in ``model.device_map`` is refused before anything loads (issue 16, item 10).

It used to pass validation, the estimate said FITS, and the run died loading with "Cannot copy out of meta tensor".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blipmon import cli
from blipmon.core.config import ConfigError, resolve, validate
from blipmon.estimate import timeline

REFUSAL = "disk offload is not supported"


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "_local_gpu_bytes", lambda: None)


@pytest.mark.parametrize(
    ("device_map", "key"),
    [
        ({"": "disk"}, "model.device_map['']"),
        ({"language_model": 0, "vision_model": "disk"}, "model.device_map.vision_model"),
        ({"language_model": "cpu", "query_tokens": "disk"}, "model.device_map.query_tokens"),
    ],
)
def test_disk_anywhere_in_a_device_map_is_refused_with_the_key(device_map: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        validate({"model": {"device_map": device_map}})
    msg = str(ei.value)
    assert f"{key} = 'disk': {REFUSAL}" in msg
    assert "'cpu'" in msg  # what to do instead


def test_the_same_map_on_the_cpu_is_fine() -> None:
    cfg = validate({"model": {"device_map": {"language_model": 0, "vision_model": "cpu"}}})
    assert cfg["model"]["device_map"] == {"language_model": 0, "vision_model": "cpu"}


def test_estimate_never_says_fits_for_disk(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", "tiny/blip2-opt", "--set", 'model.device_map={"" = "disk"}', "--gpu-memory", "80GiB"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""  # no table, no verdict
    assert REFUSAL in err and "Traceback" not in err


def test_a_toml_file_with_disk_offload_is_refused_by_run_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import blipmon.runner.models as models

    def no_load(*_a: object, **_k: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    f = tmp_path / "offload.toml"
    f.write_text(
        'name = "offload"\n[model]\nid = "tiny/blip2-opt"\ndevice_map = { "" = "disk" }\n[job]\nkind = "load"\n'
    )
    out = tmp_path / "runs"
    code = cli.main(["run", str(f), "--out", str(out)])
    assert code == 2
    assert REFUSAL in capsys.readouterr().err
    assert not out.exists()  # no run directory: nothing started
    with pytest.raises(ConfigError, match=REFUSAL):
        resolve(str(f))
