"""The deployment files: docker-compose.yml validated by Debian's docker-compose (skips when absent; there
is no Docker engine on CI, so the image build itself cannot run), what the image would import and how its
settings resolve, .dockerignore, .env.example, a fresh clone without .env, and the container health check.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from service.settings import Settings, SettingsError, check_settings
from tests.server import REPO_ROOT, free_port

COMPOSE = shutil.which("docker-compose")
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
# DOCTORGLM_* names in .env.example that docker compose (not Settings) reads, or the logging setup.
NOT_SETTINGS = {"DOCTORGLM_PUBLISH", "DOCTORGLM_GPU", "DOCTORGLM_IMAGE"}

needs_compose = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed "
                                                           "(apt-get install docker-compose)")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the compose project with .env made from .env.example, as an operator would."""
    shutil.copy(REPO_ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copytree(REPO_ROOT / "docker", tmp_path / "docker")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    return tmp_path


def compose(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    return subprocess.run([COMPOSE, "--project-directory", str(project), "-f", str(project / "docker-compose.yml"),
                           *args], capture_output=True, text=True, timeout=60, cwd=project)


@needs_compose
def test_compose_file_validates(project: Path) -> None:
    for profile in ([], ["--profile", "replicas"]):
        result = compose(project, *profile, "config", "-q")
        assert result.returncode == 0, result.stderr
    services = yaml.safe_load(compose(project, "config").stdout)["services"]
    assert "profiles" not in services["doctorglm"], "`docker compose up` starts the single service"
    for name in ("replica-0", "replica-1", "lb"):
        assert services[name]["profiles"] == ["replicas"], f"{name} starts only with --profile replicas"


@needs_compose
def test_compose_rendered_service(project: Path) -> None:
    result = compose(project, "--profile", "replicas", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    single = services["doctorglm"]
    devices = single["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert single["restart"] in ("unless-stopped", "always")
    assert "doctorglm-healthcheck" in single["healthcheck"]["test"]
    assert [p for p in single["ports"] if str(p).startswith("127.0.0.1:")], "loopback by default"
    targets = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in single["volumes"]}
    assert {"/data/model", "/data/adapters", "/data/knowledge", "/data/cache", "/data/audit"} <= targets
    assert single["environment"]["DOCTORGLM_API_KEYS"], "env_file .env reaches the service"
    # Each replica has its own GPU and its own audit folder; nginx gets the shipped config.
    gpus = [services[f"replica-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for i in range(2)]
    assert gpus[0] != gpus[1]
    audits = [next(v for v in services[f"replica-{i}"]["volumes"] if "/data/audit" in str(v)) for i in range(2)]
    assert audits[0] != audits[1]
    assert any("nginx.conf" in str(v) for v in services["lb"]["volumes"])


def _compose_environment() -> dict[str, str]:
    anchor = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["x-doctorglm"]
    return {name: str(value) for name, value in anchor["environment"].items()}


def test_compose_passes_every_setting() -> None:
    """Without env_file, a setting reaches the container only if compose names it."""
    fields = {f"DOCTORGLM_{name.upper()}" for name in Settings.model_fields}
    missing = fields - set(_compose_environment())
    assert not missing, f"add to docker-compose.yml (x-doctorglm environment): {sorted(missing)}"


def test_a_fresh_clone_without_env_gets_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """What compose passes when .env is absent (every ${VAR:-default} at its default) gives the image's and
    the service's defaults, not empty values that break or clobber them."""
    rendered = {name: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
                for name, value in _compose_environment().items()}
    for name, value in rendered.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DOCTORGLM_KNOWLEDGE_PATH", str(REPO_ROOT / "knowledge" / "data" / "sample_diseases.jsonl"))
    settings = Settings(_env_file=None)
    defaults = Settings.model_fields
    assert (settings.host, settings.port, str(settings.cache_dir)) == ("0.0.0.0", 8000, "/data/cache")
    assert settings.max_queue == defaults["max_queue"].default and settings.model_path is None
    assert settings.safety_notice == defaults["safety_notice"].default
    with pytest.raises(SettingsError, match="DOCTORGLM_API_KEYS"):  # the one thing a fresh clone must set
        check_settings(settings)


@needs_compose
def test_compose_validates_without_env_file(project: Path) -> None:
    (project / ".env").unlink()
    result = compose(project, "config")
    assert result.returncode == 0, result.stderr
    environment = yaml.safe_load(result.stdout)["services"]["doctorglm"]["environment"]
    assert environment["DOCTORGLM_HOST"] == "0.0.0.0" and not environment["DOCTORGLM_API_KEYS"]


@needs_compose
def test_compose_rejects_a_broken_file(project: Path) -> None:
    """The validation is real: a misspelt key fails."""
    text = (project / "docker-compose.yml").read_text(encoding="utf-8")
    (project / "docker-compose.yml").write_text(text.replace("restart:", "restrat:", 1), encoding="utf-8")
    assert compose(project, "config", "-q").returncode != 0


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _first_party_imports(package: str) -> set[str]:
    """Top-level first-party packages that `package` imports, followed transitively."""
    local = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    seen, pending = set(), [package]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for source in (REPO_ROOT / name).rglob("*.py"):
            tree = ast.parse(source.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                pending += [top for top in tops if top in local and top not in ("tests", "bench")]
    return seen


def test_the_image_holds_every_package_the_service_imports() -> None:
    """`python -m service` in the image imports only what was copied in (and what pip installs from it)."""
    copied = {args.split()[0].rstrip("/") for word, args in _instructions() if word == "COPY"}
    needed = _first_party_imports("service")
    assert {"service", "knowledge", "llm", "safety"} <= needed  # the walk itself works
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)}"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert all(f'"{name}*"' in pyproject for name in needed), "pip install . packages every one"


def test_the_image_environment_is_valid_settings_that_refuse_to_run_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's DOCTORGLM_* values are real settings; on 0.0.0.0 without keys the service refuses to start."""
    env = dict(re.findall(r"(DOCTORGLM_[A-Z0-9_]+)=(\S+)", " ".join(a for w, a in _instructions() if w == "ENV")))
    fields = {f"DOCTORGLM_{name.upper()}" for name in Settings.model_fields}
    assert env and set(env) <= fields, set(env) - fields
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DOCTORGLM_KNOWLEDGE_PATH", str(REPO_ROOT / "knowledge" / "data" / "sample_diseases.jsonl"))
    settings = Settings(_env_file=None)
    assert not settings.is_loopback()
    with pytest.raises(SettingsError, match="DOCTORGLM_API_KEYS"):
        check_settings(settings)


def test_the_image_runs_unprivileged_and_ships_no_weights() -> None:
    """Guards for two deployment rules (a non-root process; weights are mounted, never baked in)."""
    steps = _instructions()
    users = [a for w, a in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    weights = re.compile(r"(model|weight|adapter|checkpoint|\.cache|safetensors|\.bin|\.pt\b|\.gguf)", re.I)
    for word, args in steps:
        if word in ("COPY", "ADD"):
            assert not weights.search(args) and "http" not in args, f"{word} {args}"


def test_dockerignore_keeps_secrets_weights_and_caches_out() -> None:
    lines = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    for pattern in (".venv", ".cache", ".env", ".git", "**/*.safetensors", "**/*.bin"):
        assert pattern in lines, pattern


def test_env_example_is_valid_settings(tmp_path: Path) -> None:
    """Every DOCTORGLM_* line names a real setting, and the file parses with the service's own Settings."""
    fields = {f"DOCTORGLM_{name.upper()}" for name in Settings.model_fields}
    names = set(re.findall(r"^#?\s*(DOCTORGLM_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M))
    unknown = names - fields - NOT_SETTINGS
    assert not unknown, f".env.example names settings that do not exist: {sorted(unknown)}"
    for needed in ("DOCTORGLM_API_KEYS", "DOCTORGLM_MODEL_PATH", "DOCTORGLM_ADAPTER_PATH", "DOCTORGLM_QUANTIZATION",
                   "DOCTORGLM_KNOWLEDGE_PATH", "DOCTORGLM_ENGINE", "DOCTORGLM_UPSTREAM_URL"):
        assert needed in names, needed
    settings = Settings(_env_file=str(ENV_EXAMPLE))
    assert settings.keys() and settings.model_path == Path("/data/model") and settings.adapter_path is None


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_container_healthcheck_script() -> None:
    script = REPO_ROOT / "docker" / "healthcheck.py"
    down = subprocess.run([sys.executable, str(script)], env={"DOCTORGLM_PORT": str(free_port())},
                          capture_output=True, timeout=20)
    assert down.returncode == 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        up = subprocess.run([sys.executable, str(script)], env={"DOCTORGLM_PORT": str(server.server_port)},
                            capture_output=True, timeout=20)
        assert up.returncode == 0, up.stderr
    finally:
        server.shutdown()
        server.server_close()
