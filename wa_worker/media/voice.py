"""Voice notes: OGG/Opus (what WhatsApp plays as a push-to-talk note), converted by ffmpeg when needed.

ffmpeg and ffprobe run as subprocesses under a deadline (anyio), their output bounded,
killed on timeout or cancellation. Input files are never modified; outputs are 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

from wa_worker.fsutil import FILE_MODE, ensure_private_dir
from wa_worker.media.errors import MediaError
from wa_worker.media.sniff import sniff_mimetype

OUTPUT_LIMIT = 8 * 1024  # bytes kept of a subprocess's stdout (head) and stderr (tail)
# What WhatsApp's own voice notes are: Ogg/Opus, mono, 16 kHz input rate, speech mode, 60 ms packets
# (docs/media.md; 48 kHz notes are reported to fail on iOS).
OPUS_ARGS = ("-vn", "-map_metadata", "-1", "-c:a", "libopus", "-b:a", "32k", "-ac", "1", "-ar", "16000",
             "-application", "voip", "-frame_duration", "60", "-f", "ogg")


def is_ogg_opus(path: Path) -> bool:
    """True when ``path`` starts with an Ogg page carrying an Opus stream header."""
    with open(path, "rb") as f:
        head = f.read(27 + 255 + 8)
    return head[:4] == b"OggS" and b"OpusHead" in head[27:]


def _file_arg(path: Path) -> str:
    """``file:/abs/path``: ffmpeg never reads a name as an option or another protocol (``concat:``, ``http:``)."""
    return "file:" + os.path.abspath(path)


async def _drain(stream: ByteReceiveStream | None, buf: bytearray, keep_tail: bool) -> None:
    if stream is None:
        return
    async for chunk in stream:
        buf += chunk
        if len(buf) > OUTPUT_LIMIT:
            if keep_tail:
                del buf[:-OUTPUT_LIMIT]
            else:
                del buf[OUTPUT_LIMIT:]


async def run_bounded(argv: list[str], timeout_s: float) -> tuple[int, bytes, bytes]:
    """(exit code, stdout head, stderr tail); raises TimeoutError after ``timeout_s`` (process killed)."""
    proc = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_drain, proc.stdout, out, False)
                tg.start_soon(_drain, proc.stderr, err, True)
            code = await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    return code, bytes(out), bytes(err)


def _last_line(err: bytes) -> str:
    lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no error output"


def _finish_output(out: Path) -> bool:
    """Make the output 0600; True when it holds OGG/Opus audio (local file ops, microseconds)."""
    os.chmod(out, FILE_MODE)
    return out.stat().st_size > 0 and is_ogg_opus(out)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def to_ogg_opus(src: Path, dest_dir: Path, *, timeout_s: float = 120.0, ffmpeg: str | None = None) -> Path:
    """``src`` itself when it is already OGG/Opus, else a new 0600 ``voice-*.ogg`` in ``dest_dir``.

    Raises ``MediaError("media_conversion_failed", ...)`` without ffmpeg, on a failed or
    timed-out conversion, or when the result is not OGG/Opus; no output file is left behind.
    """
    if is_ogg_opus(src):
        return src
    exe = ffmpeg or shutil.which("ffmpeg")
    if exe is None:
        kind = sniff_mimetype(src, None, None)
        raise MediaError(
            "media_conversion_failed",
            f"voice notes need ffmpeg to convert {kind} to OGG/Opus: install ffmpeg (the Docker image has it)",
        )
    ensure_private_dir(Path(dest_dir))
    fd, name = tempfile.mkstemp(prefix="voice-", suffix=".ogg", dir=dest_dir)
    os.close(fd)
    out = Path(name)
    ok = False
    try:
        argv = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", _file_arg(src), *OPUS_ARGS,
                _file_arg(out)]
        try:
            code, _, err = await run_bounded(argv, timeout_s)
        except TimeoutError:
            raise MediaError(
                "media_conversion_failed",
                f"converting the voice note to OGG/Opus took longer than {timeout_s:g} s; send a shorter recording",
            ) from None
        except OSError as exc:
            raise MediaError("media_conversion_failed", f"could not run ffmpeg ({exc.strerror or exc})") from None
        if code != 0:
            kind = sniff_mimetype(src, None, None)
            raise MediaError(
                "media_conversion_failed",
                f"ffmpeg could not convert the voice note ({kind}) to OGG/Opus: {_last_line(err)}; "
                "send an audio file (MP3, M4A, WAV, OGG)",
            )
        if not _finish_output(out):
            raise MediaError("media_conversion_failed", "ffmpeg produced no OGG/Opus audio; send an audio file")
        ok = True
        return out
    finally:
        if not ok:
            _remove(out)


async def duration_seconds(path: Path, *, timeout_s: float = 15.0, ffprobe: str | None = None) -> float | None:
    """The media's length in seconds by ffprobe; None without ffprobe or when it cannot tell."""
    exe = ffprobe or shutil.which("ffprobe")
    if exe is None:
        return None
    argv = [exe, "-v", "error", "-show_entries", "format=duration", "-of", "default=noprint_wrappers=1:nokey=1",
            _file_arg(path)]
    try:
        code, out, _ = await run_bounded(argv, timeout_s)
    except (TimeoutError, OSError):
        return None
    if code != 0:
        return None
    try:
        value = float(out.decode("ascii", "replace").strip().splitlines()[0])
    except (ValueError, IndexError):
        return None
    return value if value >= 0 else None
