"""What the cluster test (tests/test_cluster.py) found, each pinned down on its own (issue #13)."""

from __future__ import annotations

import pytest

from tests.conftest import connect, make_settings, running_worker, wait_until
from tests.fakeleases import LeaseBook
from tests.fakeproxy import FakeProxy

pytestmark = pytest.mark.anyio


async def test_a_batch_claim_for_an_instance_still_connecting_is_sent_once_it_connects(tmp_path):
    """A batch poll may claim messages of an instance whose session is (re)connecting here: a proxy
    counts it as connected from the last status it heard (a lease that just moved here, the old
    holder's CONNECTED still standing). They were dropped, left ``sending`` at the proxy until its
    re-offer minutes later; they are sent once the session is up."""
    proxy = FakeProxy(batch=True, claim=True)  # claim: each message handed out once
    proxy.add_instance("a")
    proxy.add_instance("b")
    await proxy.start()
    try:
        async with running_worker(make_settings(tmp_path, proxy.url)) as w:
            await connect(w, proxy, "a")
            await connect(w, proxy, "b")
            w.backend.fail_connects["b"] = 3  # b's next dials fail: it reconnects with a backoff
            await w.backend.session("b").drop()
            await wait_until(lambda: w.manager.runners["b"].state.value != "connected", what="b reconnecting")
            proxy.enqueue("b", "m1", "5511988887777", "while b reconnects")
            await wait_until(lambda: not proxy.queue["b"], what="m1 claimed by the batch poll")
            assert w.manager.runners["b"].state.value != "connected"  # claimed while b was not connected
            await wait_until(lambda: "m1" in proxy.sent_marks, timeout=20, what="m1 sent once b is back")
            assert [r["body"] for r in w.backend.sent("b")] == ["while b reconnects"]
    finally:
        await proxy.stop()
