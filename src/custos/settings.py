"""One Settings object for the server: CUSTOS_* environment variables, an optional TOML file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Settings(BaseSettings):
    """Server configuration; secrets are SecretStr so they never print."""

    model_config = SettingsConfigDict(env_prefix="CUSTOS_", extra="forbid")

    data_dir: Path = Path("var")
    db: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default is SQLite in the data directory",
    )
    host: str = "127.0.0.1"
    port: int = 8443
    insecure_http: bool = False
    tls_hostnames: list[str] = Field(default_factory=list)
    public_url: str | None = Field(
        default=None, description="URL agents use, when it differs from what requests show"
    )
    workers: int = 1
    db_pool_size: int = Field(default=20, ge=1, le=500)

    admin_password: SecretStr | None = None
    ca_passphrase: SecretStr | None = None

    # device protocol
    checkin_interval_s: int = 60
    signature_skew_s: int = 300
    last_seen_flush_s: float = 5.0
    push_backend: Literal["auto", "memory", "postgres"] = Field(
        default="auto", description="wake-up channel; auto: NOTIFY on PostgreSQL, else in-process"
    )

    # limits on what a client controls
    max_body_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_output_bytes: int = 1024 * 1024
    max_commands_per_checkin: int = 50

    api_token_ttl_s: int = 12 * 3600

    @field_validator("port")
    @classmethod
    def _port_range(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError("port must be between 0 and 65535")
        return v

    @property
    def database_url(self) -> str:
        """The configured URL, or SQLite inside the data directory."""
        if self.db:
            return self.db
        return f"sqlite+aiosqlite:///{(self.data_dir / 'custos.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        """Whether the embedded SQLite database is in use."""
        return self.database_url.startswith("sqlite")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments win over the environment, which wins over the TOML file."""
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the file named by CUSTOS_CONFIG (a flat TOML table of settings), if any."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        import os

        path = os.environ.get("CUSTOS_CONFIG")
        if not path:
            return {}
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
        return data.get("server", data)
