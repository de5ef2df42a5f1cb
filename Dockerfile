# wa-worker: one container, one volume at /data.
# Debian slim (glibc): neonize ships manylinux wheels for amd64 and arm64, no musl wheel.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libmagic1: neonize imports python-magic; ffmpeg: voice notes are converted to OGG/Opus (docs/media.md)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmagic1 ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# dependencies first, exactly as locked (every file's sha256, amd64 and arm64): a layer that
# changes only with requirements.lock; then the package alone, built by the locked setuptools
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY wa_worker ./wa_worker
RUN pip install --no-deps --no-build-isolation . && python -c "import neonize.aioze.client, wa_worker.daemon"

# a non-root user owning /data (a fresh named volume inherits this ownership)
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin wa \
 && mkdir -p /data/auth /data/state \
 && chown -R wa:wa /data \
 && chmod 700 /data /data/auth /data/state

USER wa
# goneonize reads it at load: no "AI" badge on 1:1 messages (WA_BOT_BADGE=true turns it on)
ENV NEONIZE_BOT_TAG=off
ENV PORT=3000 \
    AUTH_DIR=/data/auth \
    STATE_DB=/data/state/wa-worker.db

VOLUME /data
EXPOSE 3000

# no curl in the image: Python asks /health (liveness only; /ready is for traffic decisions)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3000'), timeout=4)"]

# exec form: SIGTERM reaches the worker, which reports DISCONNECTED and exits 0
CMD ["wa-worker"]
