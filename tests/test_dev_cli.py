"""``wa-worker dev``: the CLI helpers, the terminal printer, the state folder, and
the whole thing end to end with the simulator backend in a real subprocess."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli
from tests.fakeproxy import SECRET
from tests.proc import free_port
from wa_worker.backends.base import Connected, QrCode
from wa_worker.dev.background import BackgroundProxy
from wa_worker.dev.cli import build_parser, main
from wa_worker.dev.proxy import ProxyEvent
from wa_worker.dev.state import DevPaths, DevStateError, resolve_secret
from wa_worker.dev.terminal import TerminalPrinter, render_qr

def test_instance_add_and_list(dev_proxy: BackgroundProxy, state_dir: Path, capsys) -> None:
    d = str(state_dir)
    code, out, _ = run_cli(capsys, "instance", "list", "--dir", d)
    assert code == 0 and "no instances" in out
    code, out, _ = run_cli(capsys, "instance", "add", "acme-sales", "--dir", d)
    assert code == 0 and "added instance acme-sales (DISCONNECTED)" in out
    code, out, _ = run_cli(capsys, "--dir", d, "instance", "add", "acme-vip", "--priority", "5")
    assert code == 0
    assert dev_proxy.store.get_instance("acme-vip")["priority"] == 5
    code, _, err = run_cli(capsys, "instance", "add", "acme-sales", "--dir", d)
    assert code == 1 and "already exists" in err
    dev_proxy.store.update_status("acme-sales", "CONNECTED", qr_code=None, phone_number="5511999990000")
    code, out, _ = run_cli(capsys, "instance", "list", "--dir", d)
    assert code == 0
    assert re.search(r"acme-sales\s+CONNECTED\s+\+5511999990000", out)
    assert re.search(r"acme-vip\s+DISCONNECTED", out)


def test_bad_instance_name_is_a_usage_error(state_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["instance", "add", "no/slashes", "--dir", str(state_dir)])
    assert exc.value.code == 2


def test_send_and_messages(dev_proxy: BackgroundProxy, state_dir: Path, capsys) -> None:
    d = str(state_dir)
    dev_proxy.store.add_instance("acme")
    code, out, _ = run_cli(capsys, "send", "acme", "+55 11 99999-0000", "Olá, mundo", "--dir", d)
    assert code == 0
    mid = re.search(r"queued (m-[0-9a-f]+)", out).group(1)
    msg = dev_proxy.store.get_message(mid)
    assert (msg["instanceId"], msg["to"], msg["body"], msg["status"]) == ("acme", "+55 11 99999-0000", "Olá, mundo", "queued")
    dev_proxy.store.add_inbound("acme", {"wa_message_id": "W1", "from": "5511988887777@s.whatsapp.net", "body": "oi",
                                        "push_name": "Maria"})
    code, out, _ = run_cli(capsys, "messages", "--dir", d)
    assert code == 0
    lines = out.strip().splitlines()
    assert "out  acme  → +55 11 99999-0000  [queued] Olá, mundo" in lines[0] and mid in lines[0]
    assert "in   acme  ← 5511988887777@s.whatsapp.net (Maria)  oi" in lines[1]
    code, out, _ = run_cli(capsys, "messages", "--dir", d, "--json", "--instance", "acme")
    assert code == 0 and '"wa_message_id": "W1"' in out and mid in out
    code, _, err = run_cli(capsys, "send", "ghost", "5511999990000", "x", "--dir", d)
    assert code == 1 and "unknown instance ghost" in err
    code, _, err = run_cli(capsys, "messages", "--dir", d, "--limit", "0")
    assert code == 2


PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                        "0000000d49444154789c6364f8cf000000040001a2f1d1bb0000000049454e44ae426082")


def test_send_media_file_reply_and_caption(dev_proxy: BackgroundProxy, state_dir: Path, tmp_path: Path, capsys) -> None:
    """``send --media FILE`` queues the bytes (base64 through the dev API) with its type and reply."""
    import hashlib

    d = str(state_dir)
    dev_proxy.store.add_instance("acme")
    photo = tmp_path / "foto.png"
    photo.write_bytes(PNG_1X1)
    code, out, err = run_cli(capsys, "send", "acme", "5511999990000", "--media", str(photo), "--caption", "olha",
                             "--reply-to", "3EB0AAA", "--dir", d)
    assert code == 0, err
    mid = re.search(r"queued (m-[0-9a-f]+) \(image\)", out).group(1)
    msg = dev_proxy.store.get_message(mid)
    assert (msg["type"], msg["body"], msg["filename"], msg["mimetype"], msg["reply_to"]) == (
        "image", "olha", "foto.png", "image/png", "3EB0AAA")
    assert msg["media_sha256"] == hashlib.sha256(PNG_1X1).hexdigest()
    assert (dev_proxy.store.media_dir / msg["media_sha256"]).read_bytes() == PNG_1X1
    # a voice note from a file, with an explicit type; a document named differently
    code, out, _ = run_cli(capsys, "send", "acme", "5511999990000", "--media", str(photo), "--type", "document",
                           "--filename", "scan.png", "--dir", d)
    assert code == 0
    doc = dev_proxy.store.get_message(re.search(r"queued (m-[0-9a-f]+)", out).group(1))
    assert (doc["type"], doc["filename"]) == ("document", "scan.png")
    code, out, _ = run_cli(capsys, "messages", "--dir", d)
    assert "[image foto.png reply to 3EB0AAA] olha" in out and "[document scan.png]" in out


def test_send_location_contact_reaction(dev_proxy: BackgroundProxy, state_dir: Path, tmp_path: Path, capsys) -> None:
    d = str(state_dir)
    dev_proxy.store.add_instance("acme")
    vcard_file = tmp_path / "ana.vcf"
    vcard_file.write_text("BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nTEL;waid=5511977776666:+5511977776666\nEND:VCARD\n")
    runs = [
        ("--location=-23.5614,-46.6559", "--place", "MASP", "--address", "Av. Paulista, 1578"),
        ("--contact-name", "Suporte", "--contact-phone", "+55 11 4000-0000"),
        ("--reaction", "👍", "--reply-to", "3EB0AAA"),
        ("--reaction", "", "--reply-to", "3EB0AAA"),
        ("--media-url", "https://cdn.example/n.mp3", "--type", "voice"),
        ("--vcard", str(vcard_file)),
    ]
    for extra in runs:
        code, _, err = run_cli(capsys, "send", "acme", "5511999990000", *extra, "--dir", d)
        assert code == 0, (extra, err)
    claimed = dev_proxy.store.claim_messages("acme")
    assert [m.get("type") for m in claimed] == ["location", "contact", "reaction", "reaction", "voice", "contact"]
    assert (claimed[0]["latitude"], claimed[0]["longitude"], claimed[0]["name"], claimed[0]["address"]) == (
        -23.5614, -46.6559, "MASP", "Av. Paulista, 1578")
    assert claimed[1]["contact"] == {"name": "Suporte", "phone": "+55 11 4000-0000"}
    assert (claimed[2]["reaction"], claimed[3]["reaction"], claimed[2]["reply_to"]) == ("👍", "", "3EB0AAA")
    assert claimed[4]["media_url"] == "https://cdn.example/n.mp3"
    assert claimed[5]["type"] == "contact" and claimed[5]["vcard"].startswith("BEGIN:VCARD\nVERSION:3.0\nFN:Ana")
    # and `messages` describes what came in, one line each
    for rec in ({"wa_message_id": "L1", "type": "location", "body": "", "latitude": -23.5, "longitude": -46.6,
                 "name": "MASP"},
                {"wa_message_id": "R1", "type": "reaction", "body": "", "reaction": {"emoji": "❤", "target_id": "L1"}},
                {"wa_message_id": "V1", "type": "voice", "body": "", "media": {"url": None, "mimetype": "audio/ogg"},
                 "media_error": "too_large"},
                {"wa_message_id": "E1", "type": "edit", "body": "new text", "target_id": "T1"}):
        dev_proxy.store.add_inbound("acme", {"from": "5511988887777@s.whatsapp.net", **rec})
    code, out, _ = run_cli(capsys, "messages", "--dir", d)
    assert code == 0
    for expected in ("[location MASP -23.5 -46.6]", "[reaction ❤ on L1]", "[voice media not kept: too_large]",
                     "[edit T1] new text", "[contact Suporte +55 11 4000-0000]"):
        assert expected in out, expected


def test_send_refusals_are_one_line(dev_proxy: BackgroundProxy, state_dir: Path, tmp_path: Path, capsys) -> None:
    d = str(state_dir)
    dev_proxy.store.add_instance("acme")
    code, _, err = run_cli(capsys, "send", "acme", "5511999990000", "--dir", d)
    assert code == 2 and "nothing to send" in err
    code, _, err = run_cli(capsys, "send", "acme", "5511999990000", "--media", str(tmp_path / "missing.png"),
                           "--dir", d)
    assert code == 2 and "cannot read" in err and "missing.png" in err
    code, _, err = run_cli(capsys, "send", "acme", "5511999990000", "--reaction", "👍", "--dir", d)
    assert code == 1 and "reply_to" in err  # the proxy's reason, from the worker's own parser
    code, _, err = run_cli(capsys, "send", "acme", "5511999990000", "x", "--caption", "y", "--dir", d)
    assert code == 2 and "not both" in err
    with pytest.raises(SystemExit):
        main(["send", "acme", "1", "--location", "south", "--dir", d])
    assert dev_proxy.store.list_outbound() == []


def test_send_wait(dev_proxy: BackgroundProxy, state_dir: Path, capsys) -> None:
    """``--wait`` returns 0 once a worker marks the message sent, 1 on failure."""
    dev_proxy.store.add_instance("acme")

    def fake_worker(outcome: str) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for m in dev_proxy.store.claim_messages("acme"):
                if outcome == "sent":
                    dev_proxy.store.mark_sent(m["id"], "WA-1")
                else:
                    dev_proxy.store.mark_failed(m["id"], "send failed: boom")
                return
            time.sleep(0.05)

    for outcome, expected in (("sent", 0), ("failed", 1)):
        t = threading.Thread(target=fake_worker, args=(outcome,))
        t.start()
        code, out, _ = run_cli(capsys, "send", "acme", "5511999990000", "x", "--wait", "--dir", str(state_dir))
        t.join()
        assert code == expected, out
        assert ("sent m-" in out and "WA-1" in out) if expected == 0 else "send failed: boom" in out
    code, out, _ = run_cli(capsys, "send", "acme", "5511999990000", "x", "--wait", "--timeout", "0.5",
                           "--dir", str(state_dir))
    assert code == 1 and "still not sent" in out


def test_secret_and_url_resolution(dev_proxy: BackgroundProxy, state_dir: Path, capsys, monkeypatch) -> None:
    d = str(state_dir)
    # explicit URL and secret win
    code, _, _ = run_cli(capsys, "instance", "list", "--dir", d, "--proxy-url", dev_proxy.url, "--secret", SECRET)
    assert code == 0
    code, out, err = run_cli(capsys, "instance", "list", "--dir", d, "--secret", "wrong-secret-123")
    assert code == 1 and "refused the secret" in err and "wrong-secret-123" not in out + err
    monkeypatch.setenv("WORKER_SECRET", "wrong-from-env-123")
    code, _, err = run_cli(capsys, "instance", "list", "--dir", d)
    assert code == 1 and "refused the secret" in err
    monkeypatch.setenv("WORKER_SECRET", SECRET)
    monkeypatch.setenv("WA_DEV_PROXY_URL", dev_proxy.url)
    code, _, _ = run_cli(capsys, "instance", "list", "--dir", str(state_dir.parent / "elsewhere"))
    assert code == 0


def test_helper_errors_without_proxy_or_secret(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("WORKER_SECRET", raising=False)
    monkeypatch.delenv("WA_DEV_PROXY_URL", raising=False)
    code, _, err = run_cli(capsys, "messages", "--dir", str(tmp_path / "none"))
    assert code == 1 and "no secret" in err and "start `wa-worker dev` first" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run_cli(capsys, "messages", "--dir", str(tmp_path), "--secret", SECRET,
                           "--proxy-url", f"http://127.0.0.1:{port}")
    assert code == 1 and "cannot reach the dev proxy" in err


# ---------------------------------------------------------------------------- state folder


def test_secret_generated_private_and_reused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WORKER_SECRET", raising=False)
    paths = DevPaths(tmp_path / "state")
    with pytest.raises(DevStateError):
        resolve_secret(paths)
    first = resolve_secret(paths, create=True)
    assert len(first) >= 32
    assert stat.S_IMODE(paths.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.auth_dir.stat().st_mode) == 0o700
    assert resolve_secret(paths, create=True) == first
    assert resolve_secret(paths) == first
    monkeypatch.setenv("WORKER_SECRET", "from-the-environment")
    assert resolve_secret(paths) == "from-the-environment"
    assert resolve_secret(paths, "from-the-flag") == "from-the-flag"
    with pytest.raises(DevStateError):
        resolve_secret(paths, "short")


# ---------------------------------------------------------------------------- terminal printer


def text_qr_to_image(block: str):
    from PIL import Image

    rows: list[list[int]] = []
    for line in block.splitlines():
        top, bottom = [], []
        for ch in line:
            top.append(1 if ch in "█▀" else 0)
            bottom.append(1 if ch in "█▄" else 0)
        rows += [top, bottom]
    width = max(len(r) for r in rows)
    scale = 8
    img = Image.new("L", (width * scale, len(rows) * scale), 255)
    for y, row in enumerate(rows):
        for x, dark in enumerate(row):
            if dark:
                img.paste(0, (x * scale, y * scale, (x + 1) * scale, (y + 1) * scale))
    return img


def test_terminal_qr_is_scannable() -> None:
    zxingcpp = pytest.importorskip("zxingcpp")
    # a whatsmeow-like pairing string (ref, noise key, identity key, adv secret)
    code = "2@" + "A" * 80 + "," + "bm9pc2Uta2V5LWJhc2U2NA" * 2 + "=," + "aWRlbnRpdHk" * 3 + "=,YWR2LXNlY3JldA=="
    block = render_qr(code, color=False)
    found = zxingcpp.read_barcodes(text_qr_to_image(block))
    assert [f.text for f in found] == [code]
    colored = render_qr(code, color=True)
    assert colored.splitlines()[0].startswith("\x1b[30;107m") and colored.endswith("\x1b[0m")


def test_printer_lines_and_qr_dedupe() -> None:
    buf = io.StringIO()
    p = TerminalPrinter(buf, page_url="http://127.0.0.1:8787/")
    assert p.color is False
    p.worker_event("acme", QrCode("2@first"))
    p.worker_event("acme", QrCode("2@first"))  # the same code again is not reprinted
    p.worker_event("acme", QrCode("2@second"))
    p.worker_event("acme", Connected(jid="5511999990000@s.whatsapp.net"))
    p.worker_event("acme", QrCode("2@second"))  # after a new pairing it is shown again
    p.proxy_event(ProxyEvent("status", "acme", {"old_status": "CONNECTING", "status": "CONNECTED",
                                               "phone_number": "5511999990000"}))
    p.proxy_event(ProxyEvent("status", "acme", {"old_status": "CONNECTED", "status": "DISCONNECTED",
                                               "reason": "logged_out"}))
    msg = {"id": "m-1", "instanceId": "acme", "to": "5511988887777", "body": "line one\nline two",
           "wa_message_id": "W1", "error": "send failed: \x1b[31mred"}
    p.proxy_event(ProxyEvent("queued", "acme", {"message": msg}))
    p.proxy_event(ProxyEvent("sent", "acme", {"message": msg}))
    p.proxy_event(ProxyEvent("failed", "acme", {"message": msg}))
    p.proxy_event(ProxyEvent("inbound", "acme", {"message": {
        "from": "5511988887777@s.whatsapp.net", "push_name": "Mal\x1b]0;pwned\x07", "body": "oi\x1b[2J"}}))
    out = buf.getvalue()
    assert out.count("scan this QR code") == 3
    assert "open http://127.0.0.1:8787/" in out
    assert "[acme] status CONNECTING → CONNECTED as +5511999990000" in out
    assert "[acme] status CONNECTED → DISCONNECTED (logged_out)" in out
    assert "[acme] queued m-1 → 5511988887777: line one line two" in out
    assert "[acme] sent m-1 → 5511988887777 (wa id W1)" in out
    assert "[acme] failed m-1 → 5511988887777: send failed: \\x1b[31mred" in out
    assert "← 5511988887777@s.whatsapp.net (Mal\\x1b]0;pwned\\x07): oi\\x1b[2J" in out
    assert "\x1b" not in out and "\x07" not in out


# ---------------------------------------------------------------------------- end to end


def wa(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wa_worker", "dev", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


# long: one user session through the real CLI, step by step
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dev_simulator_end_to_end(tmp_path: Path) -> None:
    proxy_port, worker_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL")}
    env["PYTHONUNBUFFERED"] = "1"
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wa_worker", "dev", "--simulator",
             "--proxy-port", str(proxy_port), "--port", str(worker_port)],
            cwd=tmp_path, env=env, stdout=out_f, stderr=err_f,
        )
    try:
        state = tmp_path / ".wa-worker"
        wait_until(lambda: (state / "proxy-url").exists(), 30, "the proxy to start")
        secret = (state / "secret").read_text().strip()
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "secret").stat().st_mode) == 0o600
        assert (state / "proxy-url").read_text().strip() == f"http://127.0.0.1:{proxy_port}"

        # the first instance appears and the simulator "scans" its QR code
        def connected() -> bool:
            r = wa("instance", "list", cwd=tmp_path, env=env)
            return r.returncode == 0 and re.search(r"^default\s+CONNECTED\s+\+\d+", r.stdout, re.M) is not None

        wait_until(connected, 60, "the default instance to be CONNECTED")

        r = wa("send", "default", "+55 11 99999-0000", "hello from the e2e test", "--wait", "--timeout", "30",
               cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "sent m-" in r.stdout
        r = wa("messages", cwd=tmp_path, env=env)
        assert r.returncode == 0
        assert re.search(r"out  default  → \+55 11 99999-0000  \[sent\] hello from the e2e test", r.stdout)

        # a contact writes to the simulated phone
        resp = httpx.post(
            f"http://127.0.0.1:{worker_port}/simulator/instances/default/inbound",
            headers={"Authorization": f"Bearer {secret}"},
            json={"from": "5511988887777", "body": "hi"},
            trust_env=False,
        )
        assert resp.status_code == 200, resp.text

        def inbound_listed() -> bool:
            r = wa("messages", cwd=tmp_path, env=env)
            return re.search(r"in   default  ← 5511988887777@s\.whatsapp\.net\S*  hi$", r.stdout, re.M) is not None

        wait_until(inbound_listed, 30, "the inbound message")

        # a second instance added with the helper gets connected too
        r = wa("instance", "add", "second", cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: "CONNECTED" in wa("instance", "list", cwd=tmp_path, env=env).stdout.split("second")[-1],
                   60, "the second instance")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert code == 0, stdout + stderr
    assert secret not in stdout and secret not in stderr
    assert f"reference proxy on http://127.0.0.1:{proxy_port}/" in stdout
    assert "[default] scan this QR code" in stdout
    assert "[default] status CONNECTING → CONNECTED" in stdout
    assert "[default] sent m-" in stdout
    assert "[default] ← 5511988887777@s.whatsapp.net" in stdout and ": hi" in stdout
    assert "[default] status CONNECTED → DISCONNECTED (shutdown)" in stdout
    assert not (state / "proxy-url").exists()
    assert (state / "proxy.db").exists() and (state / "state" / "wa-worker.db").exists()

    # the QR block printed in the terminal decodes
    zxingcpp = pytest.importorskip("zxingcpp")
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "scan this QR code" in line) + 1
    block = []
    for line in lines[start:]:
        if not line.strip() and block and not set(block[-1]) - {" "}:
            break
        if line and set(line) <= set(" █▀▄"):
            block.append(line)
        else:
            break
    found = zxingcpp.read_barcodes(text_qr_to_image("\n".join(block)))
    assert len(found) == 1 and found[0].text


@pytest.mark.slow
def test_dev_proxy_only_and_busy_port(tmp_path: Path) -> None:
    """``wa-worker dev proxy`` serves alone; a busy port or a busy state folder fails clearly."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wa_worker", "dev", "proxy", "--proxy-port", str(port), "--instance", "solo",
         "--lease-ttl", "7"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: (tmp_path / ".wa-worker" / "proxy-url").exists(), 30, "the proxy")
        r = wa("instance", "list", cwd=tmp_path, env=env)
        assert r.returncode == 0 and re.search(r"^solo\s+DISCONNECTED", r.stdout, re.M)
        secret = (tmp_path / ".wa-worker" / "secret").read_text().strip()
        leased = httpx.post(f"http://127.0.0.1:{port}/leases", json={"worker_id": "w-sub"}, trust_env=False,
                            headers={"Authorization": f"Bearer {secret}"}).json()
        assert leased["ttl_s"] == 7 and [i["instanceId"] for i in leased["leases"]] == ["solo"]
        again = wa("proxy", "--proxy-port", str(port), "--dir", str(tmp_path / "other"), cwd=tmp_path, env=env,
                   timeout=30)
        assert again.returncode == 1 and "cannot listen" in again.stderr
        # the same state folder twice (two workers on one AUTH_DIR) is refused
        same = wa("--simulator", "--proxy-port", str(free_port()), "--port", str(free_port()), cwd=tmp_path, env=env,
                  timeout=30)
        assert same.returncode == 1 and "in use by another" in same.stderr
        assert (tmp_path / ".wa-worker" / "proxy-url").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "worker        not started" in out
    assert "leases of 7 s" in out


@pytest.mark.slow
def test_dev_worker_port_busy(tmp_path: Path) -> None:
    """The worker cannot listen: one clear line, exit 1, the proxy closed and its URL file removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = wa("--simulator", "--proxy-port", str(free_port()), "--port", str(port), cwd=tmp_path, env=env,
               timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the worker stopped: OSError" in r.stdout and f"is port {port} busy?" in r.stdout
    assert not (tmp_path / ".wa-worker" / "proxy-url").exists()
    assert "Traceback" not in r.stderr


def test_dev_with_a_damaged_journal_fails_in_one_line_and_keeps_it(tmp_path: Path) -> None:
    """``wa-worker dev`` applies the daemon's start-up checks: a damaged STATE_DB is named, never replaced."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL")}
    db = tmp_path / ".wa-worker" / "state" / "wa-worker.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a journal\n" * 20)
    r = wa("--simulator", "--proxy-port", str(free_port()), "--port", str(free_port()), cwd=tmp_path, env=env,
           timeout=30)
    assert r.returncode == 1, r.stderr
    assert f"STATE_DB {db} is not a SQLite database (file kept untouched)" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert db.read_bytes() == b"this is not a journal\n" * 20


def test_instance_list_shows_the_lease_holder(dev_proxy: BackgroundProxy, state_dir: Path, capsys) -> None:
    d = str(state_dir)
    dev_proxy.store.add_instance("acme")
    dev_proxy.store.add_instance("beta")
    r = httpx.post(dev_proxy.url + "/leases", headers={"Authorization": f"Bearer {SECRET}", "X-Worker-Id": "w-a1"},
                       json={"worker_id": "w-a1", "capacity": 1}, trust_env=False)
    assert r.status_code == 200 and len(r.json()["leases"]) == 1
    leased = r.json()["leases"][0]["instanceId"]
    code, out, _ = run_cli(capsys, "instance", "list", "--dir", d)
    assert code == 0
    assert re.search(rf"{leased}\s+DISCONNECTED\s+\[lease w-a1 #1\]", out)
    other = ({"acme", "beta"} - {leased}).pop()
    assert "lease" not in next(line for line in out.splitlines() if line.startswith(other))


def test_the_lease_ttl_option_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WA_DEV_LEASE_TTL_S", raising=False)
    assert build_parser().parse_args(["proxy"]).lease_ttl == 30
    assert build_parser().parse_args(["proxy", "--lease-ttl", "2.5"]).lease_ttl == 2.5
    monkeypatch.setenv("WA_DEV_LEASE_TTL_S", "4")
    assert build_parser().parse_args([]).lease_ttl == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["proxy", "--lease-ttl", "0"])
