"""`cpa-fhir sandbox`, the project's main job, as a person runs it from a shell.

It listens, creates the store and loads patients A–D into it (once: a restart on
the same store loads nothing), prints the base URL and how to get a token;
`cpa-fhir sandbox token` prints one, and the two together give a partner's
consent-filtered view over HTTP. Ctrl-C stops it cleanly (exit status 130, as
for any command it interrupts). An address it cannot
listen on, or a port out of range, is one line and a non-zero exit, before any
banner, with nothing left running.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

CLI = [sys.executable, "-m", "cpa_fhir"]


@contextmanager
def running_sandbox(db: str) -> Iterator[tuple[str, list[str]]]:
    """The sandbox on a free port: its base URL and the lines it printed first.
    Stopped with Ctrl-C (SIGINT) on leaving, which must end it cleanly."""
    process = subprocess.Popen(
        [*CLI, "sandbox", "--db", db, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    printed: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("clients:") for line in printed):  # the banner's last
            line = process.stdout.readline()
            if not line or time.monotonic() > deadline:
                _, err = process.communicate(timeout=30)
                pytest.fail(f"the sandbox did not start: {printed} {err}")
            printed.append(line.rstrip("\n"))
        banner = next(line for line in printed if line.startswith("FHIR base URL:"))
        base = banner.split()[3].removesuffix("/fhir")
        _wait_until_serving(base)
        yield base, printed
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    # Stopped after a clean shutdown, with the status of a command ended by Ctrl-C.
    assert process.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err, err


def _wait_until_serving(base: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{base}/fhir/metadata", timeout=5)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def token(db: str, client: str) -> str:
    done = subprocess.run(
        [*CLI, "sandbox", "token", "--client", client, "--db", db],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_run_command_serves_patients_a_to_d_and_a_token_opens_them(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'sandbox.db'}"
    with running_sandbox(db) as (base, printed):
        assert any(line.startswith("loaded the example patients A–D") for line in printed)
        assert any("cpa-fhir sandbox token --client gp" in line for line in printed)
        metadata = httpx.get(f"{base}/fhir/metadata", timeout=10)
        assert metadata.status_code == 200
        assert metadata.json()["fhirVersion"] == "4.0.1"
        # No token, no data.
        assert httpx.get(f"{base}/fhir/Patient", timeout=10).status_code == 401
        flags = {}
        for client in ("trust", "gp"):
            bearer = {"authorization": f"Bearer {token(db, client)}"}
            found = httpx.get(
                f"{base}/fhir/Flag", params={"patient": "Patient/c-patient"}, headers=bearer
            )
            assert found.status_code == 200, found.text
            flags[client] = found.json()["total"]
        # C's risk flags are the trust's to see; her consent gives the GP none of them.
        assert flags == {"trust": 4, "gp": 0}

    # Started again on the same store: nothing loaded twice, the data still there.
    with running_sandbox(db) as (base, printed):
        assert not any(line.startswith("loaded the example") for line in printed)
        bearer = {"authorization": f"Bearer {token(db, 'trust')}"}
        patients = httpx.get(f"{base}/fhir/Patient", params={"_summary": "count"}, headers=bearer)
        assert patients.json()["total"] == 4


def _sandbox_fails(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, "sandbox", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "FHIR base URL" not in done.stdout  # nothing said of a server that is not there
    return done


def test_a_port_already_taken_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = _sandbox_fails("--db", f"sqlite:///{tmp_path / 's.db'}", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"cpa-fhir: cannot listen on 127.0.0.1 port {port}: Address already in use"
    ]
    assert not (tmp_path / "s.db").exists()  # refused before the store was made


def test_an_unknown_host_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = _sandbox_fails("--db", f"sqlite:///{tmp_path / 's.db'}", "--host", "no-such.invalid")
    assert done.returncode == 1
    assert done.stderr.startswith("cpa-fhir: cannot listen on no-such.invalid port 8080: ")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("port", ["70000", "-1", "eighty"])
def test_a_port_that_is_not_one_is_a_usage_error(tmp_path: Path, port: str) -> None:
    done = _sandbox_fails("--db", f"sqlite:///{tmp_path / 's.db'}", "--port", port)
    assert done.returncode == 2
    assert "--port" in done.stderr


def test_a_store_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    done = _sandbox_fails("--db", "mysql://somewhere/db", "--port", "0")
    assert done.stderr.strip().splitlines() == [
        "cpa-fhir: cannot open the store mysql://somewhere/db: unsupported store URL "
        "mysql://: use sqlite:///FILE or postgresql://..."
    ]


def test_the_token_of_an_unknown_client_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "sandbox", "token", "--client", "nobody", "--db", f"sqlite:///{tmp_path / 's.db'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode != 0
    assert done.stderr.startswith("cpa-fhir: no client 'nobody': the sandbox has ")
    assert len(done.stderr.strip().splitlines()) == 1


# -- every address a host name names --------------------------------------------------


_GETADDRINFO = socket.getaddrinfo


def _both_loopbacks(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
    """getaddrinfo, as on a machine whose hosts file gives localhost both loopbacks."""
    if host != "localhost":
        return _GETADDRINFO(host, port, *args, **kwargs)
    return [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),  # listed twice
    ]


def _ipv6_loopback_usable() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


def test_localhost_is_listened_on_at_each_of_its_addresses_on_one_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cpa_fhir.cli import _listen

    monkeypatch.setattr(socket, "getaddrinfo", _both_loopbacks)
    listening = _listen("localhost", 0)
    try:
        addresses = sorted(s.getsockname()[0] for s in listening)
        ports = {s.getsockname()[1] for s in listening}
        # ::1 where the machine has IPv6, and 127.0.0.1 always (named twice, bound once).
        assert addresses == (["127.0.0.1", "::1"] if _ipv6_loopback_usable() else ["127.0.0.1"])
        (port,) = ports
        assert port != 0
        for address in addresses:  # each takes connections
            socket.create_connection((address, port)).close()
    finally:
        for s in listening:
            s.close()


def test_a_port_taken_on_one_of_a_hosts_addresses_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer

    from cpa_fhir.cli import _listen

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setattr(socket, "getaddrinfo", _both_loopbacks)
        with pytest.raises(typer.Exit) as stopped:
            _listen("localhost", port)
    assert stopped.value.exit_code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on localhost port {port}" in lines[0]


def test_port_0_chooses_again_when_its_port_is_taken_at_another_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cpa_fhir.cli import _listen

    real = socket.create_server
    refused: list[int] = []

    def create_server(address: tuple[str, int], **kwargs: Any) -> socket.socket:
        # Another program holds 127.0.0.1 at the first port chosen at ::1.
        if address[0] == "127.0.0.1" and address[1] != 0 and not refused:
            refused.append(address[1])
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return real(address, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", _both_loopbacks)
    monkeypatch.setattr(socket, "create_server", create_server)
    listening = _listen("localhost", 0)
    try:
        ports = {s.getsockname()[1] for s in listening}
        assert len(ports) == 1
        if _ipv6_loopback_usable():  # ::1 took a port first, and 127.0.0.1 was refused it
            assert refused and refused[0] not in ports
            assert sorted(s.getsockname()[0] for s in listening) == ["127.0.0.1", "::1"]
    finally:
        for s in listening:
            s.close()
