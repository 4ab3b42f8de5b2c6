"""Run the whole test suite: `python3 scripts/test.py [pytest arguments]`.

Works on a fresh machine with python3 (3.11+): sets up `.venv`, installs Synapse into
its own cached venv (so the first integration test does not spend its time
installing), installs what the nginx, client library, browser and PostgreSQL tests
need (as root with apt-get: the Debian packages nginx, openssl, chromium, postgresql
when there is no `initdb`, and nodejs and npm when there is no `node`; then `npm ci` in
tests/js, tests/js43 (matrix-js-sdk 43.0.0 and the Node.js 22 it runs on, both npm
packages) and tests/browser, each when its lockfile changed),
runs `ruff check` (proxy, tests, scripts, bench, rig), then pytest with the given
arguments. The exit status is pytest's (5, "no tests collected", counts as a
failure), or 1 if only ruff failed.
"""

from __future__ import annotations

import subprocess
import sys

from _bootstrap import ROOT, enter_venv, say, use_repository_modules

# Linted as a whole: the proxy, the tests, the scripts, the benchmark and the rig.
LINTED = ["proxy", "tests", "scripts", "bench", "rig"]


def main() -> int:
    enter_venv()
    use_repository_modules()
    from rig.programs import (
        JS_PROJECTS,
        debian_packages_to_install,
        ensure_js_packages,
        find_postgres_bindir,
        find_program,
        install_debian_packages,
    )
    from rig.synapse import SYNAPSE_SPEC, ensure_synapse_venv, synapse_venv_path

    say(f"Synapse: {SYNAPSE_SPEC} in {synapse_venv_path()}")
    try:
        ensure_synapse_venv(say=say)
    except RuntimeError as e:
        say(f"error: {e}")
        return 1

    # nginx for tests/test_nginx_synapse.py; chromium for tests/test_browser_synapse.py;
    # postgresql for the store's PostgreSQL backend (the tests start a throwaway cluster
    # of their own, rig/postgres.py, and stop it at the end of the session); Node.js and
    # npm for matrix-js-sdk, playwright-core and esbuild. A `node` from elsewhere
    # (nodesource, nvm) is kept: Debian's nodejs is installed only without one.
    if not install_debian_packages(debian_packages_to_install(), say=say):
        say("the tests that need them are skipped (or fail under CI)")
    postgres_bindir = find_postgres_bindir()
    if postgres_bindir is None:
        say("warning: no PostgreSQL, so its tests are skipped (or fail under CI)")
    else:
        say(f"PostgreSQL: {postgres_bindir} (a throwaway cluster per test session)")
    if find_program("npm") is None:
        say("warning: no npm, so no matrix-js-sdk (its tests are skipped, or fail under CI)")
    else:
        for project in JS_PROJECTS:
            try:
                ensure_js_packages(project, say=say)
            except RuntimeError as e:
                say(f"warning: {e}")

    say("ruff check " + " ".join(LINTED))
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", *LINTED], cwd=ROOT)

    args = sys.argv[1:]
    say("pytest " + " ".join(args))
    tests = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT).returncode
    if tests == 5:
        say("FAILED: pytest ran no tests")
    elif tests != 0:
        say(f"FAILED: pytest exited with {tests}")
    if lint.returncode != 0:
        say("FAILED: ruff check found problems")
        return tests or 1
    if tests == 0:
        say("all passed")
    return tests


if __name__ == "__main__":
    sys.exit(main())
