"""All settings, read from DOCTORGLM_* environment variables and an optional .env file."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm.paths import DEFAULT_CACHE_DIR, SAMPLE_LIBRARY

DEFAULT_SAFETY_NOTICE = (
    "本回答由人工智能生成，仅供参考，不能替代医生的面诊、诊断和治疗；如症状加重或出现紧急情况，请立即就医或拨打120。"
)


# An empty variable means "not set" (docker-compose.yml passes every setting, empty when .env lacks it).
_CONFIG = SettingsConfigDict(env_prefix="DOCTORGLM_", env_file=".env", extra="ignore", env_ignore_empty=True)


class ModelSettings(BaseSettings):
    """Which model answers, and how it is loaded (or where the upstream engine is)."""

    model_config = _CONFIG

    model_path: Path | None = Field(
        None, description="Causal-LM directory. Empty: the embedded default built under cache_dir."
    )
    adapter_path: Path | None = Field(None, description="A peft (LoRA) adapter merged into the model at load.")
    trust_remote_code: bool = False
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    quantization: Literal["none", "int8", "int4"] = "none"
    pack_cpu_linear: bool = Field(True, description="On CPU, run large linear layers with their weights packed "
                                  "once for oneDNN (llm/cpu_linear.py); false = plain nn.Linear.")
    engine: Literal["local", "openai"] = "local"
    upstream_url: str | None = None
    upstream_model: str | None = None
    upstream_api_key: SecretStr | None = None
    upstream_timeout_s: float = Field(120.0, gt=0)
    served_model_name: str = "doctorglm"


class KnowledgeSettings(BaseSettings):
    """The disease library, its cached index, and the brief written into the prompt."""

    model_config = _CONFIG

    knowledge_path: Path = SAMPLE_LIBRARY
    cache_dir: Path = DEFAULT_CACHE_DIR
    dialogues_path: str = Field(
        "auto", description="Dialogue JSONL folder for the retrieval's patients'-words view: auto (a dialogues/ "
        "folder beside the library file, if there is one), none (off), or a folder.")
    brief_chars: int = Field(600, ge=50, le=8000, description="Character budget of the disease brief.")
    retrieval_k: int = Field(3, ge=1, le=20)


class GenerationSettings(BaseSettings):
    """What one request may ask for, and the engine's batch and queue."""

    model_config = _CONFIG

    max_input_chars: int = Field(4000, ge=1)
    max_history_turns: int = Field(20, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(256, ge=1)
    context_tokens: int = Field(2048, ge=64, description="Prompt + answer token budget.")
    max_batch_size: int = Field(8, ge=1)
    max_queue: int = Field(64, ge=1)
    prompt_cache_mb: int = Field(512, ge=0, description="Memory for reused prompt beginnings' keys/values "
                                 "(on the model's device); 0 = off.")
    repetition_guard: bool = True


class ServerSettings(BaseSettings):
    """Where it listens, the HTTP limits, shutdown and logs."""

    model_config = _CONFIG

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # Before any key is checked a client can only hold a connection this long, with this much header:
    max_header_bytes: int = Field(16_384, ge=1024, description="Request line + headers; over it: 431 (or 414).")
    max_url_chars: int = Field(8192, ge=256, description="Path + query; over it: 414.")
    header_timeout_s: float = Field(10.0, gt=0, description="From connect (or the previous response) to the "
                                                            "end of the headers; then 408 and close.")
    body_timeout_s: float = Field(15.0, gt=0, description="From the end of the headers to the end of the body.")
    max_connections: int = Field(256, ge=1, description="Open connections; one more is answered 503 and closed.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    drain_grace_s: float = Field(10.0, ge=0)


class AccessSettings(BaseSettings):
    """Who may call it (keys), from where (CORS, Host), what is open without a key, and the audit log."""

    model_config = _CONFIG

    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    allow_anonymous: bool = False
    cors_origins: str = ""
    trusted_hosts: str = Field("", description="Comma-separated Host names (*.example.org allowed); "
                                               "empty: any Host. Others get 400.")
    # With API keys on: the schema pages and the metrics need a key too (probes /healthz, /readyz never do).
    protect_docs: bool = True
    protect_metrics: bool = True
    audit_text: bool = False
    audit_log: Path | None = None


class SafetySettings(BaseSettings):
    """The notice on every answer and the red-flag triage."""

    model_config = _CONFIG

    safety_notice: str = DEFAULT_SAFETY_NOTICE
    red_flags_path: Path | None = None
    # The learned backstop behind the red-flag rules (on/off): on blind sets it lifts emergency recall
    # from 72% to 98% at <= 6% false alarms (docs/safety.md); a missed emergency costs more.
    triage_backstop: bool = True
    # Its weights file when on (default: the packaged safety/data/triage_backstop.json).
    triage_backstop_path: Path | None = None


class Settings(ModelSettings, KnowledgeSettings, GenerationSettings, ServerSettings, AccessSettings, SafetySettings):
    """All settings, read from DOCTORGLM_* variables (and .env): one object, grouped by concern in the
    classes above; every field has a safe default and keeps its flat DOCTORGLM_<NAME> variable."""

    model_config = _CONFIG

    @field_validator("model_path", "adapter_path", "api_keys_file", "audit_log", "red_flags_path",
                     "triage_backstop_path", "upstream_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def keys(self) -> list[str]:
        """API keys from DOCTORGLM_API_KEYS and DOCTORGLM_API_KEYS_FILE (one per line, # comments)."""
        found: list[str] = []
        if self.api_keys is not None:
            found += [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(line)
        return found

    def is_loopback(self) -> bool:
        # "" is not: socket.bind(("", port)) listens on every interface.
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def cors_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def trusted_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.trusted_hosts.split(",") if h.strip()]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value


class SettingsError(ValueError):
    """A setting is wrong; the message says what to fix."""


def check_settings(settings: Settings) -> None:
    """Refuse to start on a wrong setting, with a message that says what to fix."""
    if settings.model_path is not None and not settings.model_path.is_dir():
        raise SettingsError(
            f"DOCTORGLM_MODEL_PATH={settings.model_path} is not a directory: mount the model there or unset it"
        )
    if settings.adapter_path is not None and not settings.adapter_path.is_dir():
        raise SettingsError(f"DOCTORGLM_ADAPTER_PATH={settings.adapter_path} is not a directory")
    if not settings.knowledge_path.is_file():
        raise SettingsError(
            f"DOCTORGLM_KNOWLEDGE_PATH={settings.knowledge_path} is not a readable file (a JSONL disease library)"
        )
    if settings.api_keys_file is not None and not settings.api_keys_file.is_file():
        raise SettingsError(f"DOCTORGLM_API_KEYS_FILE={settings.api_keys_file} does not exist")
    if not settings.is_loopback() and not settings.keys() and not settings.allow_anonymous:
        raise SettingsError(
            f"refusing to listen on {settings.host} without API keys: set DOCTORGLM_API_KEYS "
            "(or DOCTORGLM_API_KEYS_FILE), or DOCTORGLM_ALLOW_ANONYMOUS=true if a gateway authenticates"
        )
    if settings.engine == "openai" and not settings.upstream_url:
        raise SettingsError("DOCTORGLM_ENGINE=openai needs DOCTORGLM_UPSTREAM_URL (an OpenAI-compatible /v1 URL)")
    if settings.default_max_new_tokens > settings.max_new_tokens:
        raise SettingsError("DOCTORGLM_DEFAULT_MAX_NEW_TOKENS must not exceed DOCTORGLM_MAX_NEW_TOKENS")
