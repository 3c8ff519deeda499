"""Concurrent writers never lose an update: with If-Match the loser gets 412; a store
written by a server killed mid-write opens consistent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx

from cpa_fhir.sandbox import Sandbox, open_sandbox, seed_examples


def test_concurrent_updates_lose_nothing(base_url: str, sandbox: Sandbox) -> None:
    token = sandbox.token_for("trust", f"{base_url}/fhir")["access_token"]
    headers = {"authorization": f"Bearer {token}", "content-type": "application/fhir+json"}
    url = f"{base_url}/fhir/Flag/a-risk-self-harm"
    start = httpx.get(url, headers=headers).json()
    version = int(start["meta"]["versionId"])
    results: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        body = dict(start)
        body["code"] = {**start["code"], "text": f"writer {n}"}
        r = httpx.put(url, json=body, headers={**headers, "if-match": f'W/"{version}"'}, timeout=30)
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [412] * 7
    after = httpx.get(url, headers=headers).json()
    assert int(after["meta"]["versionId"]) == version + 1
    # Without If-Match, every writer lands as its own version, or is told it lost.
    results.clear()

    def blind(n: int) -> None:
        body = dict(after)
        body["code"] = {**after["code"], "text": f"blind {n}"}
        r = httpx.put(url, json=body, headers=headers, timeout=30)
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=blind, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) <= {200, 409}
    final = httpx.get(url, headers=headers).json()
    assert int(final["meta"]["versionId"]) == version + 1 + results.count(200)
    history = httpx.get(f"{url}/_history", headers=headers, params={"_count": "1000"}).json()
    assert history["total"] == int(final["meta"]["versionId"])


def test_server_killed_mid_write_restarts_consistent(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'store.db'}"
    seed_examples(open_sandbox(db))
    script = textwrap.dedent(
        f"""
        import copy, os, signal
        from cpa_fhir.sandbox import open_sandbox
        box = open_sandbox({db!r})
        flag = box.repo.read("Flag", "a-risk-self-harm").resource()
        with box.repo.transaction() as tx:
            for n in range(200):
                f = copy.deepcopy(flag); f["id"] = f"crash-{{n}}"
                tx.update(f)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -9
    box = open_sandbox(db)
    query = box.repo.parse("Flag", [("_id", ",".join(f"crash-{n}" for n in range(200)))])
    assert box.repo.search(query).total == 0
    stored: Any = box.repo.read("Flag", "a-risk-self-harm")
    assert stored.version_id == 1
    assert box.repo.search(box.repo.parse("Patient", [("_summary", "count")])).total == 4
