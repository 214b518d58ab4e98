"""``epd-serve``'s command line: help with defaults, --list-configs, flags over the config, and a live
deployment under --served-model-name / --max-model-len / --api-key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import openai
import pytest

from router.serve import ROOT, Deployment, apply_overrides, config_path, load_config, parse_args, worker_plan
from tests.e2e_util import stop_serve


def test_help_gives_every_flag_a_text_and_its_default():
    out = subprocess.run([sys.executable, "-m", "router.serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    flags = re.findall(r"^  (--[\w-]+)", out, re.M)
    assert {"--config", "--host", "--port", "--sdk-port", "--timeout", "--served-model-name", "--dtype",
            "--max-model-len", "--max-num-seqs", "--kv-cache-memory-gb", "--api-key", "--device",
            "--list-configs", "--model", "--transfer"} <= set(flags)
    entries = re.split(r"\n(?=  --)", out.split("options:")[1])[1:]
    for entry in entries:
        flag = entry.split()[0]
        assert len(entry.split()) > 2, f"{flag} has no help text"
        if flag not in ("--list-configs", "--help"):
            assert "default" in entry, f"{flag} does not say its default"
    flat = " ".join(out.split())
    assert "(default: 8000)" in flat and "(default: 7102)" in flat and "(default: 300" in flat


def test_list_configs_names_every_shipped_config():
    out = subprocess.run([sys.executable, "-m", "router.serve", "--list-configs"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def test_flags_override_the_config_and_its_workers():
    args = parse_args(["--config", "gpu2-1p1d", "--device", "cpu", "--max-num-seqs", "3", "--dtype", "float32",
                       "--served-model-name", "mine", "--kv-cache-memory-gb", "0.25", "--max-model-len", "512"])
    assert config_path(args.config) == ROOT / "configs" / "gpu2-1p1d.yaml"
    cfg = apply_overrides(load_config(config_path(args.config)), args)
    assert {device for _, _, device in worker_plan(cfg)} == {"cpu"}
    dep = Deployment(cfg, "/nonexistent/model")
    assert dep.name == "mine"
    for _, argv in dep._workers():
        opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)}
        assert (opts["--device"], opts["--max-num-seqs"], opts["--dtype"]) == ("cpu", "3", "float32")
        assert (opts["--kv-cache-memory-gb"], opts["--max-model-len"]) == ("0.25", "512")


@pytest.mark.e2e
def test_served_name_context_and_api_key_live(llava_dir, tmp_path):
    from router.serve import free_port

    port, sdk = free_port(), free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "EPD_API_KEY"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "router.serve", "--config", "aggregated", "--model", llava_dir,
                                 "--port", str(port), "--sdk-port", str(sdk), "--served-model-name", "my-llava",
                                 "--max-model-len", "256", "--api-key", "s3cret"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while "epd is serving" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "s3cret" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        (entry,) = client.models.list().data
        assert (entry.id, entry.max_model_len) == ("my-llava", 256)
        out = client.completions.create(model="my-llava", prompt="Hello", max_tokens=2)
        assert out.usage.completion_tokens == 2
        with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
            client.completions.create(model="my-llava", prompt="Hello " * 300, max_tokens=2)
    finally:
        stop_serve(proc)


def test_a_port_taken_before_the_router_binds_it_is_picked_again(llava_dir, tmp_path, monkeypatch):
    """free_port() answers a port that is free now; another process can take it before the
    router binds it (seen in CI). The deployment then starts again on other ports."""
    import socket

    import router.serve as serve

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real, calls = serve.free_port, []

    def first_taken(host="127.0.0.1"):  # the first bus address picked is the squatter's
        calls.append(host)
        return taken if len(calls) == 2 else real(host)

    monkeypatch.setattr(serve, "free_port", first_taken)
    cfg = load_config(ROOT / "configs" / "aggregated.yaml")
    dep = Deployment(cfg, llava_dir, log_dir=tmp_path)
    assert dep.worker_addr.endswith(f":{taken}")
    try:
        url = dep.start(timeout=240)
        assert not dep.worker_addr.endswith(f":{taken}") and dep.health()[0] and url == dep.url
        assert "address already in use" in (tmp_path / "router.log").read_text().lower()
    finally:
        dep.stop()
        squatter.close()
