"""The development rig: real servers and programs for the tests, the benchmark and the demo.

Plain blocking code (subprocess, urllib, sockets; no pytest), so that it serves
`tests/` (through the fixtures of `tests/rig_fixtures.py`), `bench/` and `scripts/`
alike. Not part of the shipped package (`pyproject.toml` ships `proxy` only): it is
imported from the repository root, which pytest (`pythonpath = ["."]`), the scripts
(`scripts/_bootstrap.py`) and the benchmark (`bench/run.py`, `bench/soak.py`) put on
`sys.path`.

- `rig.processes`: child processes (`spawn_child`, optionally as another user:
  `RunAs`; `stop_process`, `child_pids`, `process_gone`), ports (`free_port`,
  `port_is_free`), waiting for a server (`wait_for_port`, `wait_until_answering`), a
  blocking JSON request (`http_json`, `open_direct`), `file_lock`, `tail`, `say`.
- `rig.synapse`: Synapse in a cached venv of its own (`ensure_synapse_venv`), its test
  configuration (`apply_config_overrides`) and `SynapseServer`.
- `rig.accounts`: `Account`, `register`, `login` on any client-server base URL (Synapse,
  the proxy, nginx in front).
- `rig.proxy_process`: `ProxyProcess` (`python -m proxy --config FILE`), the TOML it
  writes (`toml_dumps`, `merged`).
- `rig.nginx`: `Nginx`, one nginx in the foreground with a given `http {}` body.
- `rig.postgres`: `PostgresServer`, a throwaway PostgreSQL cluster (`initdb` in a
  directory of its own, run as the `postgres` user when we are root, loopback, a free
  port), its databases, roles and URLs, and SQL for assertions over asyncpg.
- `rig.programs`: nginx, Node.js, Chromium and PostgreSQL (`find_program`,
  `find_postgres_bindir`, `locate`), the Debian packages that bring them
  (`debian_packages_to_install`, `install_debian_packages`), and `npm ci` per JS
  project (`JS_PROJECTS`, `ensure_js_packages`).
"""

from __future__ import annotations

from pathlib import Path

# The checkout: `python -m proxy` runs from here, the JS projects and README.md are here.
REPO_ROOT = Path(__file__).resolve().parent.parent
