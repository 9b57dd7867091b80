"""The README's code works as written: its `python` and `bash` blocks run, twice in a row,
against a fresh real server. The first two blocks are the set-up commands (installing
packages is CI's job, not this test's); blocks fenced as `text` are illustrations."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "127.0.0.1:50051"
BLOCK = re.compile(r"^```(\w*)\n(.*?)\n```$", re.S | re.M)


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_opens_with_exactly_the_two_set_up_commands():
    (server_lang, server), (tests_lang, tests), *_ = readme_blocks()
    assert (server_lang, tests_lang) == ("bash", "bash")
    assert "\n" not in server and "kvstore-server" in server and "--port 50051" in server
    assert "\n" not in tests and "pytest" in tests


def test_readme_code_runs_twice_against_a_fresh_server(start_server, tmp_path):
    server = start_server()
    runnable = [(lang, code.replace(README_ADDRESS, server.address)) for lang, code in readme_blocks()[2:]
                if lang in ("python", "bash")]
    assert [lang for lang, _ in runnable].count("python") >= 2 and "bash" in [lang for lang, _ in runnable]
    bin_dir = tmp_path / "bin"            # `kvstore` runs the client of the tree under test
    bin_dir.mkdir()
    shim = bin_dir / "kvstore"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kvstore_client "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    work = tmp_path / "work"
    work.mkdir()
    for attempt in (1, 2):
        for lang, code in runnable:
            command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
            result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"run {attempt}, {lang} block:\n{code}\n{result.stdout}\n{result.stderr}"
            for noise in ("Traceback", "Exception ignored", "Warning"):    # what a user would see beside the output
                assert noise not in result.stderr, f"run {attempt}, {lang} block:\n{code}\n{result.stderr}"
