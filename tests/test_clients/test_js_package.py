"""clients/js as an npm package: what `npm pack` would ship, its types, and the package driven by node
against a real server (through its package.json `exports`, as an installed dependency is)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.proxy import CutAfter, DropAnswer, Proxy, Relay
from tests.test_clients.conftest import Keyed

PACKAGE = ROOT / "clients" / "js"


def node(*args: str, cwd: Path = ROOT, timeout: float = 120) -> str:
    assert shutil.which("node"), "node is needed for these tests (the client is JavaScript)"
    done = subprocess.run(["node", *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_npm_pack_ships_the_module_its_types_and_readme() -> None:
    assert shutil.which("npm"), "npm is needed for this test"
    done = subprocess.run(
        ["npm", "pack", "--dry-run", "--json"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ | {"npm_config_update_notifier": "false", "npm_config_fund": "false"},
    )
    assert done.returncode == 0, done.stderr
    (packed,) = json.loads(done.stdout)
    assert {f["path"] for f in packed["files"]} == {"package.json", "tasktrail.mjs", "tasktrail.d.ts", "README.md"}
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert (manifest["name"], manifest["type"], manifest["engines"]["node"]) == ("tasktrail-client", "module", ">=18")
    assert manifest["exports"]["."] == {"types": "./tasktrail.d.ts", "default": "./tasktrail.mjs"}
    assert manifest["license"]


def test_the_types_declare_every_export_and_method() -> None:
    listing = node(
        "--input-type=module",
        "-e",
        "const m = await import('./clients/js/tasktrail.mjs');"
        "console.log(JSON.stringify({exports: Object.keys(m),"
        " methods: Object.getOwnPropertyNames(m.TaskManager.prototype).filter(n => n !== 'constructor'),"
        " fields: Object.keys(new m.TaskManager())}));",
    )
    found = json.loads(listing)
    types = (PACKAGE / "tasktrail.d.ts").read_text()
    declared = set(re.findall(r"^export declare (?:class|function|const) (\w+)", types, re.M))
    declared |= set(re.findall(r"^export \{\w+ as (\w+)\};", types, re.M))
    assert set(found["exports"]) == declared
    manager = types.split("export declare class TaskManager", 1)[1].split("\n}\n", 1)[0]
    for method in found["methods"]:
        assert re.search(rf"^\s+{method}\(", manager, re.M), f"TaskManager.{method} has no type"
    for field in found["fields"]:
        assert re.search(rf"^\s+{field}: ", manager, re.M), f"TaskManager.{field} has no type"


def test_the_package_against_a_real_server(server: str, keyed_server: Keyed, tmp_path: Path) -> None:
    # An installed package: node_modules/tasktrail-client is the folder, as `npm install` would link it.
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "tasktrail-client").symlink_to(PACKAGE, target_is_directory=True)
    shutil.copy(ROOT / "tests" / "js" / "package_client.mjs", tmp_path / "package_client.mjs")
    with (
        Proxy(server, lambda n: CutAfter(4) if n == 0 else Relay()) as cut,
        Proxy(server, lambda n: DropAnswer() if n == 0 else Relay()) as drop,
    ):
        args = [server, cut.url, drop.url, keyed_server.url, keyed_server.keys["write"]]
        out = node("package_client.mjs", *args, cwd=tmp_path)
        assert "package client: ok" in out
        assert cut.dropped == [0]
        assert drop.dropped == [0]


def test_a_server_that_goes_silent_is_given_up_after_the_timeout() -> None:
    # No timeout at all: a read hung for undici's 5 minutes, and so did a watch on a stream gone quiet.
    out = node(str(ROOT / "tests" / "js" / "silent_client.mjs"), str(PACKAGE / "tasktrail.mjs"), timeout=60)
    assert "silent client: ok" in out
