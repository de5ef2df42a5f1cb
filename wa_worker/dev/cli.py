"""``wa-worker dev …``: local development without any external service.

    wa-worker dev [--simulator] [--dir DIR] [--proxy-port N] [--port N] ...
        the reference proxy + the worker in one process (Ctrl-C stops both)
    wa-worker dev proxy [--dir DIR] [--proxy-port N] [--port N]
        the reference proxy alone (run a worker yourself against it)
    wa-worker dev instance add NAME [--priority N] [--phone DIGITS]
    wa-worker dev instance set NAME [--setting KEY=VALUE ...] [--unset KEY ...] [--reset]
                               [--upstream-proxy URL | --direct]
    wa-worker dev instance list
    wa-worker dev send INSTANCE TO [TEXT] [--media FILE | --media-url URL] [--type T]
                       [--caption TEXT] [--filename NAME] [--reply-to ID]
                       [--location=LAT,LON [--place NAME] [--address TEXT]]
                       [--contact-name NAME --contact-phone PHONE | --vcard FILE]
                       [--reaction EMOJI --reply-to ID] [--wait] [--timeout S]
    wa-worker dev messages [--instance ID] [--limit N] [--json]
    wa-worker dev inbound INSTANCE FROM TEXT     (simulator) a contact writes to the phone
    wa-worker dev scan INSTANCE                  (simulator) the phone scans the QR code

The helpers talk HTTP to the running proxy (``inbound`` and ``scan``: to the
worker); they find it and its secret through the state folder (``--dir``, default
``.wa-worker`` in the current directory or the nearest parent that has one), or
``--proxy-url`` / ``$WA_DEV_PROXY_URL`` and ``--secret`` / ``$WORKER_SECRET``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..ids import is_valid_instance_id
from .client import ClientError, DevClient, WorkerClient, resolve_proxy_url, resolve_worker_url
from .state import DEFAULT_DIR, DevPaths, DevStateError, find_state_dir, resolve_secret
from .text import clip, describe

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _instance_id(value: str) -> str:
    if not is_valid_instance_id(value):
        raise argparse.ArgumentTypeError("must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return port


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


LEASE_TTL_ENV = "WA_DEV_LEASE_TTL_S"


def _lease_ttl(value: str) -> float:
    number = _positive(value)
    if number > 3600:
        raise argparse.ArgumentTypeError("must be at most 3600 seconds")
    return number


SEND_TYPES = ("text", "image", "video", "audio", "voice", "document", "sticker", "location", "contact", "reaction")
MAX_SEND_FILE_BYTES = 64 * 1024 * 1024  # the dev proxy's cap (and the worker's MEDIA_MAX_BYTES default)


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def _lat_lon(value: str) -> tuple[float, float]:
    try:
        lat, lon = (float(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("must be LAT,LON in degrees, e.g. -23.5614,-46.6559") from None
    return lat, lon


def _add_dir(p: argparse.ArgumentParser, *, top: bool) -> None:
    p.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR if top else argparse.SUPPRESS,
        help="state folder (default ./.wa-worker)",
    )


def _add_serve_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--proxy-host", default=d("127.0.0.1"), help="proxy bind address (default 127.0.0.1)")
    p.add_argument("--proxy-port", type=_port, default=d(8787), help="proxy port (default 8787)")
    p.add_argument("--port", type=_port, default=d(3000), help="worker health/wake port, PORT (default 3000)")
    p.add_argument(
        "--instance",
        type=_instance_id,
        default=d("default"),
        help="id of the instance created when there is none (default: default)",
    )
    p.add_argument(
        "--no-instance",
        dest="create_instance",
        action="store_false",
        default=d(True),
        help="do not create a first instance",
    )
    p.add_argument("--secret", default=d(None), help="shared secret (default: $WORKER_SECRET or DIR/secret)")
    p.add_argument("--lease-ttl", type=_lease_ttl, metavar="S", default=d(os.environ.get(LEASE_TTL_ENV, "30")),
                   help=f"a fleet: the TTL of the leases POST /leases grants (default: ${LEASE_TTL_ENV}, else 30)")


def _helper_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    _add_dir(p, top=False)
    p.add_argument("--proxy-url", default=None, help="proxy URL (default: the running one, else :8787)")
    p.add_argument("--secret", default=argparse.SUPPRESS, help="shared secret (default: $WORKER_SECRET or DIR/secret)")
    return p


# long: the argparse declarations of every dev command, read top to bottom like --help
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wa-worker dev",
        description="Reference proxy + worker in one process, state in a local folder.",
        epilog="Helpers: wa-worker dev {proxy,instance,send,messages,inbound,scan} --help",
    )
    _add_dir(parser, top=True)
    parser.add_argument(
        "--simulator",
        action="store_true",
        help="use the offline simulator backend (QR codes are scanned automatically)",
    )
    scan = parser.add_mutually_exclusive_group()
    scan.add_argument("--auto-scan-ms", type=_non_negative, default=1500, metavar="N",
                      help="with --simulator, the phone scans each QR code after N ms (default 1500)")
    scan.add_argument("--no-auto-scan", dest="auto_scan_ms", action="store_const", const=None,
                      help="with --simulator, QR codes wait to be scanned (`wa-worker dev scan`, the page)")
    _add_serve_options(parser, top=True)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="WARNING", help="worker log level")
    parser.add_argument("-v", "--verbose", action="store_true", help="same as --log-level INFO")
    parser.add_argument("--log-format", choices=("text", "json"), type=str.lower,
                        default=os.environ.get("LOG_FORMAT", "text").lower(),
                        help="json: every line (the dev mode's own too) a JSON object on stderr "
                             "(default: LOG_FORMAT, else text)")
    parser.add_argument("--no-qr", dest="print_qr", action="store_false", help="do not draw QR codes in the terminal")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helper = _helper_parent()

    p_proxy = sub.add_parser("proxy", help="run the reference proxy alone")
    _add_dir(p_proxy, top=False)
    _add_serve_options(p_proxy, top=False)

    p_inst = sub.add_parser("instance", help="manage instances")
    inst_sub = p_inst.add_subparsers(dest="instance_command", metavar="ACTION", required=True)
    p_add = inst_sub.add_parser("add", parents=[helper], help="add an instance (the worker connects it)")
    p_add.add_argument("name", type=_instance_id, metavar="NAME")
    p_add.add_argument("--priority", type=int, default=0, help="higher connects first (default 0)")
    p_add.add_argument("--phone", help="pair with a code for this phone (digits with the country code) "
                       "besides the QR: the code shows on the page and in 'instance list'")
    p_set = inst_sub.add_parser("set", parents=[helper], help="change an instance's own settings or upstream "
                                "proxy (a connected worker picks them up within a minute)")
    p_set.add_argument("name", type=_instance_id, metavar="NAME")
    p_set.add_argument("--setting", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                       help="e.g. call_reject=true, send_max_per_minute=10, call_reject_message='Text us' "
                            "(VALUE is read as JSON when it is JSON, else as text; repeatable)")
    p_set.add_argument("--unset", action="append", default=[], metavar="KEY", help="remove a setting (repeatable)")
    p_set.add_argument("--reset", action="store_true", help="remove every setting first")
    route = p_set.add_mutually_exclusive_group()
    route.add_argument("--upstream-proxy", metavar="URL", help="dial WhatsApp through this proxy: "
                       "http://[user:pass@]host:port, https://… or socks5://… (at the instance's next connect)")
    route.add_argument("--direct", action="store_true", help="no upstream proxy (at the next connect)")
    inst_sub.add_parser("list", parents=[helper], help="list instances and their status")

    p_send = sub.add_parser("send", parents=[helper], help="queue a message (text, media, location, ...)",
                            epilog="The fields are those of a queued message: docs/proxy-contract.md, "
                                   "\"Message types\".")
    p_send.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    p_send.add_argument("to", metavar="TO", help="phone number (+55 11 99999-0000) or JID")
    p_send.add_argument("text", metavar="TEXT", nargs="?", default=None, help="the text (or the media's caption)")
    p_send.add_argument("--type", choices=SEND_TYPES, default=None,
                        help="message type (default: text, or from the file's type with --media)")
    media = p_send.add_mutually_exclusive_group()
    media.add_argument("--media", type=Path, metavar="FILE", help="send this file (image, video, audio, document...)")
    media.add_argument("--media-url", metavar="URL", help="the worker downloads the media from this http(s) URL")
    p_send.add_argument("--caption", metavar="TEXT", help="caption of an image, video or document (same as TEXT)")
    p_send.add_argument("--filename", metavar="NAME", help="file name shown for a document (default: FILE's name)")
    p_send.add_argument("--mimetype", metavar="TYPE", help="media type (default: sniffed by the proxy)")
    p_send.add_argument("--reply-to", metavar="ID", help="WhatsApp id of the message to reply (or react) to")
    p_send.add_argument("--location", type=_lat_lon, metavar="LAT,LON", help="send a location (write --location=-23.56,-46.65 when LAT is negative)")
    p_send.add_argument("--place", metavar="NAME", help="the location's name")
    p_send.add_argument("--address", metavar="TEXT", help="the location's address")
    p_send.add_argument("--contact-name", metavar="NAME", help="send a contact card (with --contact-phone)")
    p_send.add_argument("--contact-phone", metavar="PHONE", help="the contact's phone number")
    p_send.add_argument("--vcard", type=Path, metavar="FILE", help="send this vCard file as a contact")
    p_send.add_argument("--reaction", metavar="EMOJI", help="react to --reply-to ('' removes the reaction)")
    p_send.add_argument("--wait", action="store_true", help="wait until the message is sent or failed")
    p_send.add_argument("--timeout", type=_positive, default=30.0, help="with --wait, seconds (default 30)")

    p_msgs = sub.add_parser("messages", parents=[helper], help="recent inbound and outbound messages")
    p_msgs.add_argument("--instance", type=_instance_id, default=None, help="only this instance")
    p_msgs.add_argument("--limit", type=int, default=20, help="per direction (default 20, max 500)")
    p_msgs.add_argument("--json", action="store_true", help="print the raw JSON")

    worker = argparse.ArgumentParser(add_help=False, parents=[helper])
    worker.add_argument("--worker-url", default=None, help="the worker's URL (default: the running one)")
    p_in = sub.add_parser("inbound", parents=[worker], help="(simulator) a contact writes to the simulated phone")
    p_in.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    p_in.add_argument("sender", metavar="FROM", help="the contact's phone number (+55 11 98888-7777) or JID")
    p_in.add_argument("text", metavar="TEXT")
    p_in.add_argument("--name", help="the contact's display name (push name)")
    p_scan = sub.add_parser("scan", parents=[worker], help="(simulator) the phone scans the instance's QR code")
    p_scan.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    return parser


# ---------------------------------------------------------------------------- commands


def _serve(args: argparse.Namespace, *, with_worker: bool) -> int:
    # imported here, not for a cycle: the helpers (send, messages, ...) start
    # 0.3 s faster without the daemon and aiohttp
    from .run import DevOptions, run

    level = "INFO" if getattr(args, "verbose", False) and args.log_level == "WARNING" else args.log_level
    opts = DevOptions(
        dir=args.dir,
        simulator=args.simulator,
        proxy_host=args.proxy_host,
        proxy_port=args.proxy_port,
        port=args.port,
        instance=args.instance,
        create_instance=args.create_instance,
        log_level=level,
        log_format=args.log_format,
        print_qr=args.print_qr,
        with_worker=with_worker,
        secret=args.secret,
        auto_scan_ms=getattr(args, "auto_scan_ms", 1500),
        command=_command_name(),
        lease_ttl_s=args.lease_ttl,
    )
    return run(opts)


def _command_name(argv0: str | None = None) -> str:
    """How this command was typed, for copy-pasteable hints: ``.venv/bin/wa-worker``
    when run through a path (scripts/dev.sh), ``wa-worker`` when found on PATH."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name != "wa-worker":
        return "python -m wa_worker"
    on_path = shutil.which("wa-worker")
    if "/" not in argv0 or (on_path and Path(on_path).resolve() == Path(argv0).resolve()):
        return "wa-worker"
    return argv0


def _client(args: argparse.Namespace) -> DevClient:
    paths = DevPaths(find_state_dir(args.dir))
    secret = resolve_secret(paths, getattr(args, "secret", None), create=False)
    return DevClient(resolve_proxy_url(paths, args.proxy_url), secret)


def _worker_client(args: argparse.Namespace) -> WorkerClient:
    paths = DevPaths(find_state_dir(args.dir))
    secret = resolve_secret(paths, getattr(args, "secret", None), create=False)
    return WorkerClient(resolve_worker_url(paths, args.worker_url), secret)


def _sender(value: str) -> str:
    """A phone number as typed (``+55 11 98888-7777``) becomes its digits; a JID is kept."""
    if "@" in value:
        return value.strip()
    digits = "".join(c for c in value if c.isdigit())
    if not digits or any(c not in "+0123456789 -()." for c in value):
        raise ClientError(f"FROM must be a phone number (+55 11 98888-7777) or a JID, not {value!r}")
    return digits


def _cmd_inbound(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"from": _sender(args.sender), "body": args.text}
    if args.name:
        body["push_name"] = args.name
    with _worker_client(args) as w:
        data = w.simulator(args.instance, "inbound", body)
    print(f"received by {args.instance} from {body['from']} ({data.get('wa_message_id', '?')}); "
          "the worker relays it to the proxy")
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    with _worker_client(args) as w:
        w.simulator(args.instance, "scan")
    print(f"scanned {args.instance}'s QR code; it connects in a moment")
    return 0


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _setting(value: str) -> tuple[str, Any]:
    key, eq, raw = value.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError("expected KEY=VALUE, e.g. call_reject=true")
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw
    if isinstance(parsed, (dict, list)) or parsed is None:
        parsed = raw  # settings are scalars: keep what was typed
    return key.strip(), parsed


def _cmd_instance_set(c: Any, args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {key: None for key in args.unset}
    settings.update(dict(args.setting))
    body: dict[str, Any] = {"settings": settings, "replace": args.reset}
    if args.upstream_proxy is not None or args.direct:
        body["proxy_url"] = None if args.direct else args.upstream_proxy
    inst = c.set_settings(args.name, body)
    shown = json.dumps(inst.get("settings") or {}, ensure_ascii=False)
    print(f"{inst['id']}: settings {_one_line(shown)}; upstream proxy {_one_line(inst.get('proxy_url') or 'none')}")
    print("a connected instance picks these up within a minute (a proxy change at its next connect)")
    return 0


def _cmd_instance(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.instance_command == "add":
            inst = c.add_instance(args.name, args.priority, args.phone)
            print(f"added instance {inst['id']} ({inst['status']}); the worker starts connecting it now")
            return 0
        if args.instance_command == "set":
            return _cmd_instance_set(c, args)
        instances = c.list_instances()
    if not instances:
        print("no instances (add one with: wa-worker dev instance add NAME)")
        return 0
    width = max(len(i["id"]) for i in instances)
    for i in instances:
        detail = ""
        if i.get("phone_number") and i["status"] == "CONNECTED":
            detail = "+" + _one_line(i["phone_number"])
        elif i.get("reason"):
            detail = "reason: " + _one_line(i["reason"])
        elif i.get("pair_code") and i["status"] == "CONNECTING":
            detail = "pairing code " + _one_line(i["pair_code"]) + " (or scan the QR)"
        elif i.get("has_qr"):
            detail = "waiting for a QR scan"
        lease = i.get("lease")
        if lease:  # a fleet: who holds it
            held = f"{_one_line(str(lease['holder']))} #{lease['token']}" if lease.get("holder") else "free"
            detail = f"{detail}  [lease {held}{' revoked' if lease.get('revoked') else ''}]".strip()
        print(f"{i['id']:<{width}}  {i['status']:<12}  {detail}".rstrip())
    return 0


def send_fields(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(body, content fields) of ``wa-worker dev send``; :class:`SendError` for a bad combination."""
    if args.text is not None and args.caption is not None:
        raise SendError("give the text either as TEXT or as --caption, not both")
    body = args.caption if args.caption is not None else (args.text or "")
    fields: dict[str, Any] = {}
    if args.type:
        fields["type"] = args.type
    if args.reply_to:
        fields["reply_to"] = args.reply_to
    if args.media is not None:
        try:
            size = args.media.stat().st_size
            if size > MAX_SEND_FILE_BYTES:
                raise SendError(f"{args.media} is {size} bytes, over the {MAX_SEND_FILE_BYTES}-byte limit")
            data = args.media.read_bytes()
        except OSError as exc:
            raise SendError(f"cannot read {args.media}: {exc.strerror or exc}") from None
        fields["media_base64"] = base64.b64encode(data).decode("ascii")
        fields["filename"] = args.filename or args.media.name
    elif args.media_url:
        fields["media_url"] = args.media_url
        if args.filename:
            fields["filename"] = args.filename
    if args.mimetype:
        fields["mimetype"] = args.mimetype
    if args.location is not None:
        fields.setdefault("type", "location")
        fields["latitude"], fields["longitude"] = args.location
        if args.place:
            fields["name"] = args.place
        if args.address:
            fields["address"] = args.address
    if args.contact_name or args.contact_phone:
        fields.setdefault("type", "contact")
        fields["contact"] = {"name": args.contact_name, "phone": args.contact_phone}
    if args.vcard is not None:
        fields.setdefault("type", "contact")
        try:
            fields["vcard"] = args.vcard.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SendError(f"cannot read the vCard {args.vcard}: {exc}") from None
    if args.reaction is not None:
        fields.setdefault("type", "reaction")
        fields["reaction"] = args.reaction
    if not fields and not body.strip():
        raise SendError("nothing to send: give TEXT, --media FILE, --location, --contact-name or --reaction")
    return body, fields


class SendError(Exception):
    """A ``send`` command that cannot be queued (one line for the user)."""


def _cmd_send(args: argparse.Namespace) -> int:
    try:
        body, fields = send_fields(args)
    except SendError as exc:
        print(f"wa-worker dev: {exc}", file=sys.stderr)
        return 2
    with _client(args) as c:
        msg = c.queue(args.instance, args.to, body, fields)
        kind = f" ({msg['type']})" if msg.get("type", "text") != "text" else ""
        print(f"queued {msg['id']}{kind} for {args.instance} → {msg['to']}")
        if not args.wait:
            return 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            time.sleep(0.3)
            for m in c.messages(args.instance, limit=500)["outbound"]:
                if m["id"] != msg["id"]:
                    continue
                if m["status"] == "sent":
                    print(f"sent {m['id']} (wa id {m.get('wa_message_id')})")
                    return 0
                if m["status"] == "failed":
                    code = f" [{m['error_code']}]" if m.get("error_code") else ""
                    print(f"failed {m['id']}{code}: {m.get('error')}")
                    return 1
        print(f"still not sent after {args.timeout:g}s (is the instance connected?)")
        return 1


def _cmd_messages(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 500:
        print("wa-worker dev: --limit must be between 1 and 500", file=sys.stderr)
        return 2
    with _client(args) as c:
        data = c.messages(args.instance, args.limit)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    rows: list[tuple[float, str]] = []
    for m in data.get("outbound", []):
        note = m.get("error") if m["status"] == "failed" else ""
        if note and m.get("error_code"):
            note = f"[{m['error_code']}] {note}"
        rows.append(
            (
                m["created_at"] or 0,
                f"{_clock(m['created_at'])}  out  {m['instanceId']}  → {_one_line(m['to'])}  [{m['status']}] "
                f"{_one_line(describe(m))}" + (f"  ({_one_line(note)})" if note else "") + f"  {m['id']}",
            )
        )
    for m in data.get("inbound", []):
        who = _one_line(m["from"]) + (f" ({_one_line(m['push_name'])})" if m.get("push_name") else "")
        rows.append(
            (
                m["received_at"] or 0,
                f"{_clock(m['received_at'])}  in   {m['instanceId']}  ← {who}  {_one_line(describe(m))}",
            )
        )
    if not rows:
        print("no messages yet")
    for _, line in sorted(rows, key=lambda r: r[0]):
        print(line)
    return 0


def _one_line(text: str) -> str:
    return clip(text, 120)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command is None:
            if not args.simulator:  # the worker's neonize must start with the right bot tag
                from ..backends.neonize.loading import bot_badge_setting, ensure_bot_tag  # neonize mode only

                ensure_bot_tag(bot_badge_setting())
            return _serve(args, with_worker=True)
        if args.command == "proxy":
            args.simulator = False
            return _serve(args, with_worker=False)
        if args.command == "instance":
            return _cmd_instance(args)
        if args.command == "send":
            return _cmd_send(args)
        if args.command == "messages":
            return _cmd_messages(args)
        if args.command == "inbound":
            return _cmd_inbound(args)
        if args.command == "scan":
            return _cmd_scan(args)
    except (ClientError, DevStateError) as exc:
        print(f"wa-worker dev: {exc}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2
