"""clients/python is a distribution of its own: it builds as a wheel that installs, with httpx alone, into a
fresh environment without the server, and works there against a real server.

(`.ci/run` also installs it with pip straight from the folder: `pip install ./clients/python`.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# httpx and what httpx itself needs; nothing of the server's (litestar, psycopg, msgspec ...).
HTTPX_AND_ITS_OWN = {"httpx", "httpcore", "h11", "idna", "certifi", "anyio", "sniffio", "typing-extensions"}

SMOKE = """
import sys, tasktrail_client
from tasktrail_client import Client, NotFound
assert "site-packages" in tasktrail_client.__file__, tasktrail_client.__file__
try:
    import tasktrail
except ImportError:
    pass
else:
    raise AssertionError("the server's package is importable here")
with Client(sys.argv[1]) as client:
    task = client.create("packaged", {"from": "wheel"})
    with client.run(task.task_id) as run:
        run.progress(50)
        run.result = {"ok": True}
    assert client.get(task.task_id).status == "completed"
    try:
        client.get("0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f")
    except NotFound:
        print("packaged client: ok")
"""


def uv(*args: str) -> str:
    uv_path = shutil.which("uv")
    assert uv_path, "uv is needed to build the client's wheel"
    done = subprocess.run([uv_path, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_client_builds_as_a_wheel_that_installs_with_httpx_alone(server: str, tmp_path: Path) -> None:
    uv("build", "--wheel", "--out-dir", str(tmp_path / "dist"), "clients/python")
    (wheel,) = (tmp_path / "dist").glob("tasktrail_client-*-py3-none-any.whl")
    venv = tmp_path / "venv"
    uv("venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    uv("pip", "install", "--quiet", "--python", str(python), str(wheel))

    installed = {p["name"].lower() for p in json.loads(uv("pip", "list", "--format", "json", "--python", str(python)))}
    assert "tasktrail-client" in installed
    assert installed - {"tasktrail-client"} <= HTTPX_AND_ITS_OWN

    done = subprocess.run([python, "-c", SMOKE, server], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "packaged client: ok" in done.stdout
