"""README, .env.example, easypanel.json, Dockerfile, .ci/run and the code agree."""

from __future__ import annotations

import json
import re
from pathlib import Path


from wa_worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
FIELDS = Settings.model_fields
REQUIRED = {name for name, f in FIELDS.items() if f.is_required()}


def default_text(name: str) -> str:
    value = FIELDS[name].default
    if value is None:
        return ""
    if hasattr(value, "value"):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parse_env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_env_example_lists_every_setting_with_its_default():
    env = parse_env((ROOT / ".env.example").read_text())
    assert set(env) == set(FIELDS)
    for name in FIELDS:
        if name not in REQUIRED:
            assert env[name] == default_text(name), name


def test_readme_configuration_table_matches_settings():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", readme, re.M))
    assert set(rows) == set(FIELDS)
    for name, cell in rows.items():
        cell = cell.strip()
        if name in REQUIRED:
            assert cell == "*required*", name
        elif default_text(name) == "":
            assert cell == "*(empty)*", name
        else:
            assert cell == f"`{default_text(name)}`", name


# Easypanel's published app-service schema (easypanel-io/templates, utils/schema.ts: appSchema and
# the schemas it uses): the keys each object may have; "required" ones must be present
EASYPANEL_APP_FIELDS = {"projectName", "serviceName", "source", "build", "env", "basicAuth", "deploy", "domains",
                        "mounts", "ports", "resources", "maintenance"}
EASYPANEL_GITHUB_SOURCE = {"type", "owner", "repo", "ref", "path", "autoDeploy"}  # all required
EASYPANEL_DOCKERFILE_BUILD = {"type", "file"}
EASYPANEL_VOLUME_MOUNT = {"type", "name", "mountPath"}  # all required
EASYPANEL_DOMAIN = {"host", "https", "port", "path", "middlewares", "certificateResolver", "wildcard"}
EASYPANEL_DEPLOY = {"replicas", "command", "zeroDowntime", "capAdd", "capDrop", "sysctls", "groups", "tiniInit"}
EASYPANEL_NAME = re.compile(r"^[a-z0-9-_]+$")


def test_easypanel_schema_is_json_with_a_domain_and_agrees_with_settings():
    # what Easypanel's "Create from schema" takes: JSON, an app service, only fields of its app schema
    doc = json.loads((ROOT / "easypanel.json").read_text())
    assert set(doc) == {"services"}
    (service,) = doc["services"]
    assert service["type"] == "app"
    data = service["data"]
    assert set(data) <= EASYPANEL_APP_FIELDS
    assert EASYPANEL_NAME.match(data["projectName"]) and EASYPANEL_NAME.match(data["serviceName"])
    source = data["source"]
    assert source["type"] == "github" and set(source) == EASYPANEL_GITHUB_SOURCE
    assert source["path"].startswith("/") and isinstance(source["autoDeploy"], bool)
    assert all(isinstance(source[k], str) and source[k] for k in ("owner", "repo", "ref"))
    assert set(data["build"]) <= EASYPANEL_DOCKERFILE_BUILD
    assert set(data["deploy"]) <= EASYPANEL_DEPLOY
    assert all(set(m) == EASYPANEL_VOLUME_MOUNT and EASYPANEL_NAME.match(m["name"]) for m in data["mounts"])
    assert all(set(d) <= EASYPANEL_DOMAIN and d["path"].startswith("/") for d in data["domains"])
    assert data["build"] == {"type": "dockerfile", "file": "Dockerfile"}
    assert (ROOT / data["build"]["file"]).exists()
    env = parse_env(data["env"])
    assert REQUIRED <= set(env)
    assert set(env) <= set(FIELDS)
    for name, value in env.items():
        if name not in REQUIRED:
            assert value == default_text(name), name
    (mount,) = data["mounts"]
    assert mount["type"] == "volume" and mount["mountPath"] == "/data"
    for path_setting in ("AUTH_DIR", "STATE_DB"):
        assert Path(default_text(path_setting)).is_relative_to(mount["mountPath"])
    port = int(default_text("PORT"))
    # a domain routed to the container's port; no host port (Easypanel's own panel listens on 3000)
    assert "ports" not in data
    assert data["domains"] == [{"host": "$(EASYPANEL_DOMAIN)", "https": True, "port": port, "path": "/"}]
    assert data["deploy"]["replicas"] == 1 and data["deploy"]["zeroDowntime"] is False


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert "slim" in base and "alpine" not in base
    assert "libmagic1" in text
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert re.search(r"^VOLUME /data$", text, re.M)
    assert re.search(rf"^EXPOSE {default_text('PORT')}$", text, re.M)
    assert re.search(r'^CMD \["wa-worker"\]$', text, re.M)
    health = re.search(r"^HEALTHCHECK .*?(?=\n\n)", text, re.M | re.S).group(0)
    assert "curl" not in health and "/health" in health
    assert f"AUTH_DIR={default_text('AUTH_DIR')}" in text and f"STATE_DB={default_text('STATE_DB')}" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in quick.strip().splitlines()]
    assert len(commands) == 2, commands
    run, test = commands
    assert run.startswith("scripts/dev.sh") and test == "scripts/test.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec bash scripts/test\.sh$", ci, re.M)
    for script in ("scripts/dev.sh", "scripts/test.sh"):
        assert (ROOT / script).stat().st_mode & 0o111


def test_console_script_and_module_entry_point():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["wa-worker"] == "wa_worker.cli:main"
    deps = " ".join(project["dependencies"])
    for dep in ("neonize", "httpx", "anyio", "pydantic-settings", "qrcode", "pillow", "aiohttp"):
        assert dep in deps
    assert (ROOT / "wa_worker" / "__main__.py").exists()


def test_dockerfile_healthcheck_command_really_checks_health(tmp_path):
    """Run the HEALTHCHECK's exact command against a live health server and a dead port."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    text = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*?\])\s*$", text, re.M | re.S).group(1))
    assert cmd[0] == "python"
    cmd[0] = sys.executable

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        assert subprocess.run(cmd, env=env, timeout=20).returncode == 0
    finally:
        server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    env = {**os.environ, "PORT": str(dead)}
    assert subprocess.run(cmd, env=env, timeout=20, capture_output=True).returncode != 0


def test_dockerignore_keeps_tests_and_dev_state_out_of_the_build_context():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    for excluded in ("tests", ".wa-worker", ".venv", ".env", ".git", "**/__pycache__", "*.db"):
        assert excluded in lines, excluded
    # what the Dockerfile copies is not excluded
    copied = re.findall(r"^COPY (.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert src not in lines and src.rstrip("/") not in lines, src
