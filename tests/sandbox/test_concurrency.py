"""Concurrent writers never lose an update: with If-Match the loser gets 412; a store
written by a server killed mid-write opens consistent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cpa_fhir.errors import ResourceGone
from cpa_fhir.sandbox import Sandbox, open_sandbox, seed_examples


def _statuses(request: Any, writers: int = 8) -> list[int]:
    """The status of each of `writers` requests, `request(n)`, sent at once from threads."""
    results: list[int] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        status = request(n).status_code
        with lock:
            results.append(status)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_updates_lose_nothing(base_url: str, sandbox: Sandbox) -> None:
    token = sandbox.token_for("trust", f"{base_url}/fhir")["access_token"]
    headers = {"authorization": f"Bearer {token}", "content-type": "application/fhir+json"}
    url = f"{base_url}/fhir/Flag/a-risk-self-harm"
    start = httpx.get(url, headers=headers).json()
    version = int(start["meta"]["versionId"])

    def writer(n: int) -> Any:
        body = dict(start)
        body["code"] = {**start["code"], "text": f"writer {n}"}
        return httpx.put(
            url, json=body, headers={**headers, "if-match": f'W/"{version}"'}, timeout=30
        )

    results = _statuses(writer)
    assert sorted(results) == [200] + [412] * 7
    after = httpx.get(url, headers=headers).json()
    assert int(after["meta"]["versionId"]) == version + 1
    # Without If-Match, every writer lands as its own version, or is told it lost.

    def blind(n: int) -> Any:
        body = dict(after)
        body["code"] = {**after["code"], "text": f"blind {n}"}
        return httpx.put(url, json=body, headers=headers, timeout=30)

    results = _statuses(blind)
    assert set(results) <= {200, 409}
    final = httpx.get(url, headers=headers).json()
    assert int(final["meta"]["versionId"]) == version + 1 + results.count(200)
    history = httpx.get(f"{url}/_history", headers=headers, params={"_count": "1000"}).json()
    assert history["total"] == int(final["meta"]["versionId"])


def test_transactions_writing_in_opposite_orders_conflict_not_fail(
    base_url: str, sandbox: Sandbox
) -> None:
    # Each locks what it writes as it goes: on PostgreSQL two that take the same
    # resources in opposite orders deadlock, and the database rolls one back. That
    # one lost a race (409, send it again), as a writer finding another version does.
    token = sandbox.token_for("trust", f"{base_url}/fhir")["access_token"]
    headers = {"authorization": f"Bearer {token}", "content-type": "application/fhir+json"}
    start = httpx.get(f"{base_url}/fhir/Flag/a-risk-self-harm", headers=headers).json()
    start.pop("meta")
    ids = [f"opposite-{uuid.uuid4().hex[:8]}-{n}" for n in range(6)]
    for rid in ids:
        r = httpx.put(f"{base_url}/fhir/Flag/{rid}", json={**start, "id": rid}, headers=headers)
        assert r.status_code == 201, r.text
    barrier = threading.Barrier(8)

    def writer(n: int) -> Any:
        order = ids if n % 2 else ids[::-1]
        code = {**start["code"], "text": f"transaction {n}"}
        entries = [
            {
                "resource": {**start, "id": rid, "code": code},
                "request": {"method": "PUT", "url": f"Flag/{rid}"},
            }
            for rid in order
        ]
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        barrier.wait()
        return httpx.post(f"{base_url}/fhir", json=bundle, headers=headers, timeout=60)

    results = _statuses(writer)
    assert set(results) <= {200, 409}, results
    assert 200 in results
    finals = [httpx.get(f"{base_url}/fhir/Flag/{rid}", headers=headers).json() for rid in ids]
    # All or nothing: every resource holds what the last transaction to commit wrote,
    # a version for each that did.
    assert {f["meta"]["versionId"] for f in finals} == {str(1 + results.count(200))}
    assert len({f["code"]["text"] for f in finals}) == 1


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


def test_a_restart_keeps_what_was_deleted_and_written_since_the_examples(
    store_location: tuple[str, str | None],
) -> None:
    # A store whose patients were all deleted is not empty: loaded again, the
    # examples would come back, over what the trust wrote since.
    url, schema = store_location
    box = open_sandbox(url, schema=schema)
    assert seed_examples(box) > 0
    for patient in ("a-patient", "b-patient", "c-patient", "d-patient"):
        box.repo.delete("Patient", patient)
    flag = box.repo.read("Flag", "a-risk-self-harm").resource()
    flag["code"] = {**flag["code"], "text": "reassessed since"}
    box.repo.update(flag)
    box.close()
    box = open_sandbox(url, schema=schema)
    try:
        assert seed_examples(box) == 0
        with pytest.raises(ResourceGone):
            box.repo.read("Patient", "a-patient")
        stored = box.repo.read("Flag", "a-risk-self-harm")
        assert stored.resource()["code"]["text"] == "reassessed since"
        assert stored.version_id == 2
    finally:
        box.close()


def test_sandboxes_starting_together_load_the_examples_once(
    store_location: tuple[str, str | None],
) -> None:
    url, schema = store_location
    open_sandbox(url, schema=schema).close()  # the schema made, as the first would
    script = textwrap.dedent(
        f"""
        from cpa_fhir.sandbox import open_sandbox, seed_examples
        print(seed_examples(open_sandbox({url!r}, schema={schema!r})))
        """
    )
    starting = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    loaded = [int(process.communicate(timeout=120)[0]) for process in starting]
    assert all(process.returncode == 0 for process in starting)
    # One loaded them; the others found them there.
    assert sorted(loaded) == [0, 0, 0, max(loaded)] and max(loaded) > 0
    box = open_sandbox(url, schema=schema)
    try:
        assert box.repo.read("Patient", "a-patient").version_id == 1
    finally:
        box.close()
