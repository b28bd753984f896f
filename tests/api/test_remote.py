"""strato-remote: ch-remote's verbs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import pytest

from strato.cli import remote
from tests.api.helpers import ApiEnv, FakeFactory


def run(env: ApiEnv, *argv: str) -> int:
    return remote.main(["--api-socket", str(env.path), *argv])


def test_every_verb(
    fake_env: tuple[ApiEnv, FakeFactory], capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    env, _ = fake_env
    assert run(env, "ping") == 0
    assert json.loads(capsys.readouterr().out)["features"] == ["kvm"]
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(env.config_json()))
    assert run(env, "create", str(cfg)) == 0
    assert capsys.readouterr().out == ""  # 204: nothing printed
    for verb in ("boot", "pause", "resume"):
        assert run(env, verb) == 0
    assert run(env, "info") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "Running"
    assert run(env, "counters") == 0
    assert "_disk0" in json.loads(capsys.readouterr().out)
    for verb in ("reboot", "shutdown", "boot", "power-button", "delete", "shutdown-vmm"):
        assert run(env, verb) == 0, verb
    assert env.controller.wait(5)


def test_create_from_stdin(
    fake_env: tuple[ApiEnv, FakeFactory], monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _ = fake_env
    stdin = io.TextIOWrapper(io.BytesIO(json.dumps(env.config_json()).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert run(env, "create") == 0
    assert env.client.info()["state"] == "Created"


def test_errors(fake_env: tuple[ApiEnv, FakeFactory], capsys: pytest.CaptureFixture[str]) -> None:
    env, _ = fake_env
    assert run(env, "pause") == 1
    err = capsys.readouterr().err
    assert "PUT /api/v1/vm.pause: the server answered 500 Internal Server Error" in err
    assert "  1: The VM could not be paused" in err
    assert remote.main(["--api-socket", str(env.dir / "nothing.sock"), "ping"]) == 1
    assert "cannot talk to" in capsys.readouterr().err
    assert run(env, "create", str(env.dir / "missing.json")) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(env, "add-disk")
    assert e.value.code == 2


def test_module_entry_point(fake_env: tuple[ApiEnv, FakeFactory]) -> None:
    env, _ = fake_env
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.remote", "--api-socket", str(env.path), "ping"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["version"]
