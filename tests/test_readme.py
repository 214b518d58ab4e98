"""The README as a new user meets it: its install commands, its links, and every example it shows,
run against a live ``epd-serve`` started the way the README says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib

import pytest

from router.serve import ROOT, free_port, parse_args
from tests.e2e_util import stop_serve

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def blocks(lang: str) -> list[str]:
    return [code for kind, code in BLOCKS if kind == lang]


def test_serve_installs_only_what_serving_needs():
    serve, tests = (b for b in blocks("bash") if "pip install" in b)
    assert "pip install -e . && epd-serve" in serve and "[dev]" not in serve
    assert "pip install -e '.[dev]'" in tests and "pytest" in tests
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert not re.search(r"ucxx|pytest|cuda|rmm|openai|matplotlib", base), base
    extras = project["optional-dependencies"]
    assert extras["ucx"] == ["ucxx-cu12"] and "ucxx-cu12" in extras["dev"]
    assert "'.[ucx]'" in README


def test_nothing_points_outside_the_repository():
    docs = [ROOT / "README.md", ROOT / "perf" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in docs:
        text = path.read_text()
        for pattern in (r"\.\./shared", r"FACTS\.md", r"\b[Ii]ssues? #?\d+", r"/work/"):
            assert not re.search(pattern, text), f"{path.name}: {re.search(pattern, text).group(0)}"


def test_readme_addresses_are_epd_serves_defaults():
    args = parse_args([])
    assert (args.host, args.port, args.sdk_port) == ("127.0.0.1", 8000, 7102)
    assert "http://127.0.0.1:8000" in README and 'Client("tcp://127.0.0.1:7102"' in README


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """``epd-serve`` as the README runs it (on free ports: other tests may hold 8000 and 7102)."""
    port, sdk = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "epd-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "router.serve", "--port", str(port), "--sdk-port", str(sdk)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "epd is serving" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        yield port, sdk, log.read_text()
    finally:
        stop_serve(proc)


def on_ports(code: str, port: int, sdk: int) -> str:
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("127.0.0.1:7102", f"127.0.0.1:{sdk}")


def test_epd_serve_says_where_everything_is(serve):
    port, sdk, text = serve
    banner = text[text.index("epd is serving"):]
    assert f"http://127.0.0.1:{port}" in banner and f"tcp://127.0.0.1:{sdk}" in banner
    model = re.search(r"model: +(\S+)", banner).group(1)
    assert os.path.isfile(os.path.join(model, "config.json"))
    assert re.search(r"config: +\S+/configs/1e1p1d\.yaml", banner)
    assert re.search(r"workers: +encode-0 \(cpu\), prefill-0 \(cpu\), decode-0 \(cpu\)", banner)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_blocks_run(serve, index):
    port, sdk, _ = serve
    code = on_ports(blocks("python")[index], port, sdk)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), "the example printed nothing"


def test_readme_curl_runs(serve):
    port, sdk, _ = serve
    (curl,) = [b for b in blocks("bash") if b.startswith("curl")]
    run = subprocess.run(["bash", "-c", on_ports(curl, port, sdk).strip() + " --fail -sS"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert '"finish_reason"' in run.stdout
