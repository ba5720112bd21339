"""One Settings object for the server: CUSTOS_* environment variables, an optional TOML file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    from custos.accounts.directory import LdapConfig


class Settings(BaseSettings):
    """Server configuration; secrets are SecretStr so they never print."""

    # errors name the setting and the reason, never the value (it may hold a secret)
    model_config = SettingsConfigDict(
        env_prefix="CUSTOS_", extra="forbid", hide_input_in_errors=True
    )

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
    # seconds an idle HTTP keep-alive connection stays open (above the clients' 5 s)
    keep_alive_s: int = Field(default=20, ge=1, le=600)
    db_pool_size: int = Field(default=20, ge=1, le=500)

    admin_password: SecretStr | None = None
    ca_passphrase: SecretStr | None = None

    # device protocol
    checkin_interval_s: int = 60
    signature_skew_s: int = 300
    last_seen_flush_s: float = 5.0
    session_ttl_s: int = Field(
        default=6 * 3600, ge=60, le=7 * 86400, description="lifetime of a device session key"
    )
    auth_preload_devices: int = Field(
        default=200_000,
        ge=0,
        le=5_000_000,
        description="device identities each process caches at start (0: learn them on use)",
    )
    cache_resync_s: float = Field(
        default=60.0, gt=0, description="safety-net rebuild of the work index and status cache"
    )
    push_backend: Literal["auto", "memory", "postgres", "mqtt"] = Field(
        default="auto",
        description="wake-up channel; auto: NOTIFY on PostgreSQL, else in-process; "
        "mqtt: devices subscribe to a broker (the mqtt_* settings)",
    )
    # the MQTT push backend (docs/operations.md, "Push through an MQTT broker")
    mqtt_url: str = Field(
        default="mqtt://127.0.0.1:1883",
        description="broker this server publishes to: mqtt://host:1883 or mqtts://host:8883",
    )
    mqtt_device_url: str | None = Field(
        default=None, description="broker URL devices are told to use, if not mqtt_url"
    )
    mqtt_topic_prefix: str = Field(
        default="custos/wake", description="devices subscribe to <prefix>/<device id>"
    )
    mqtt_username: str | None = Field(default=None, max_length=256)
    mqtt_password: SecretStr | None = None
    mqtt_ca_file: Path | None = Field(
        default=None, description="CA bundle to verify an mqtts:// broker (default: system CAs)"
    )
    mqtt_cert_file: Path | None = Field(
        default=None, description="client certificate for the server's broker connection"
    )
    mqtt_key_file: Path | None = None

    # limits on what a client controls
    max_body_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_output_bytes: int = 1024 * 1024
    max_commands_per_checkin: int = 50
    max_package_bytes: int = Field(
        default=4 * 1024**3, ge=1024, description="largest package upload (streamed to disk)"
    )

    # software distribution
    artifact_dir: Path | None = Field(
        default=None, description="artifact store directory (default DATA_DIR/artifacts)"
    )
    software_tick_s: float = Field(
        default=2.0, gt=0, le=3600, description="how often rollouts advance and send waves"
    )
    policy_tick_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="how often policy bundles, compliance, actions and lost devices are checked",
    )
    policy_refresh_s: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="how often policy bundles are recomputed for group and label changes "
        "(policy changes are sent at once)",
    )
    software_limit_bps: int | None = Field(
        default=None,
        ge=1024,
        description="download rate limit per device when a deployment sets none (bytes/s)",
    )
    software_refresh_s: float = Field(
        default=30.0, gt=0, le=86400, description="how often group and label targets are re-read"
    )
    software_group_limit_bps: dict[str, Annotated[int, Field(ge=1024)]] = Field(
        default_factory=dict,
        description="download rate caps (bytes/s) by device group name, e.g. "
        '{"branch-office": 250000}; a device in several capped groups takes the lowest, and '
        "a deployment's own limit applies as well (the lower wins)",
    )
    transfer_sendfile: bool = Field(
        default=True,
        description="send download bodies with sendfile (zero-copy) on plain-HTTP connections",
    )
    transfer_wire_files: bool = Field(
        default=True,
        description="keep each chunk plan's wire body as one stored file, written on its first "
        "download and shared by every device with that plan (faster serving; more disk)",
    )
    transfer_offload: Literal["none", "x-accel"] = Field(
        default="none",
        description="none: this server sends download bodies (sendfile on plain HTTP); x-accel: "
        "it authorises, then a front nginx sends the stored file (docs/deploy-nginx.md)",
    )
    transfer_offload_prefix: str = Field(
        default="/_custos_blobs/",
        pattern=r"^/[A-Za-z0-9/_.-]*/$",
        description="nginx internal location that maps to ARTIFACT_DIR/blobs/ (x-accel)",
    )

    # LDAP / Active Directory sign-in (custos.accounts.directory); no ldap_url: no directory.
    # Unset filters and attribute names take the preset's values.
    ldap_url: str | None = Field(
        default=None, description="ldap://host[:port] or ldaps://host[:port]; unset: off"
    )
    ldap_preset: Literal["openldap", "active_directory"] = Field(
        default="openldap", description="which kind of server: picks the defaults below"
    )
    ldap_bind_dn: str | None = Field(
        default=None, description="service account searching users and groups (unset: anonymous)"
    )
    ldap_bind_password: SecretStr | None = Field(
        default=None, description="the service account's password"
    )
    ldap_user_base: str | None = Field(
        default=None, description="subtree holding the users (required with ldap_url)"
    )
    ldap_user_filter: str | None = Field(
        default=None, description="which entries are users (preset: inetOrgPerson / AD user)"
    )
    ldap_username_attr: str | None = Field(
        default=None, description="attribute users sign in with (preset: uid / sAMAccountName)"
    )
    ldap_group_base: str | None = Field(
        default=None, description="subtree holding the groups (default: ldap_user_base)"
    )
    ldap_group_filter: str | None = Field(
        default=None, description="which entries are groups (preset: groupOfNames / AD group)"
    )
    ldap_member_attr: str | None = Field(
        default=None, description="group attribute listing member DNs (preset: member)"
    )
    ldap_disabled_filter: str | None = Field(
        default=None,
        description="users matching it are disabled (preset: OpenLDAP administrative lock / "
        'AD ACCOUNTDISABLE bit); "" checks nothing',
    )
    ldap_start_tls: bool = Field(default=False, description="StartTLS on an ldap:// URL")
    ldap_ca_file: Path | None = Field(
        default=None, description="CA bundle for ldaps:// and StartTLS (default: system CAs)"
    )
    ldap_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="connect, response and search time limit"
    )
    ldap_max_users: int = Field(
        default=100_000, ge=1, le=10_000_000, description="a larger directory listing is refused"
    )
    ldap_role_map: dict[str, str] = Field(
        default_factory=dict,
        description='group DN or bare group name -> role, e.g. {"cn=mdm-admins,ou=groups,'
        'dc=example,dc=org": "admin", "helpdesk": "helpdesk"}',
    )
    ldap_sync_interval_s: int = Field(
        default=900, ge=60, le=7 * 86400, description="how often directory users are re-read"
    )

    @model_validator(mode="after")
    def _ldap_complete(self) -> Settings:
        self.ldap_config()  # a ValueError names the setting that is missing or wrong
        return self

    def ldap_config(self) -> LdapConfig | None:
        """The directory settings as an LdapConfig, or None when no ldap_url is set."""
        if not self.ldap_url:
            return None
        from custos.accounts.directory import LdapConfig

        if not self.ldap_user_base:
            raise ValueError("ldap_user_base is required when ldap_url is set")
        password = self.ldap_bind_password.get_secret_value() if self.ldap_bind_password else ""
        if self.ldap_bind_dn and not password:
            raise ValueError("ldap_bind_password is required with ldap_bind_dn")
        return LdapConfig.preset(
            self.ldap_preset,
            url=self.ldap_url,
            bind_dn=self.ldap_bind_dn or "",
            bind_password=password,
            user_base=self.ldap_user_base,
            group_base=self.ldap_group_base or self.ldap_user_base,
            user_filter=self.ldap_user_filter,
            username_attr=self.ldap_username_attr,
            group_filter=self.ldap_group_filter,
            member_attr=self.ldap_member_attr,
            disabled_filter=self.ldap_disabled_filter,
            start_tls=self.ldap_start_tls,
            ca_file=str(self.ldap_ca_file) if self.ldap_ca_file else None,
            timeout_s=self.ldap_timeout_s,
            max_users=self.ldap_max_users,
        )

    api_token_ttl_s: int = 12 * 3600
    # load balancers / proxies (CIDRs) whose X-Forwarded-For names the real client, for the
    # audit log and the login limiter; empty: the peer address is the client
    trusted_proxies: list[str] = Field(default_factory=list, max_length=100)
    # how often the fleet's online/offline counts are recorded for the dashboard's history
    fleet_snapshot_s: int = Field(default=900, ge=10, le=86_400)
    # freeze the objects built at start out of the garbage collector's view (shorter full
    # collections, a lower p99); off only where many apps share one process (tests)
    gc_freeze_at_start: bool = True
    # how long a console login lasts
    console_session_ttl_s: int = Field(default=8 * 3600, ge=300, le=30 * 86400)
    # OMA DM (SyncML DM 1.2): the endpoint's path, this server's identifier towards clients
    omadm_path: str = Field(default="/omadm", pattern=r"^/[A-Za-z0-9/_.-]{1,100}$")
    omadm_server_id: str = Field(
        default="custos", min_length=1, max_length=100, pattern=r"^[^\",\s]+$"
    )
    # what this server accepts and tells clients in its MaxMsgSize / MaxObjSize
    omadm_max_msg_size: int = Field(default=64 * 1024, ge=2048, le=4 * 1024 * 1024)
    omadm_max_obj_size: int = Field(default=1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    # where package #0 notifications go when an account has no hook of its own (an HTTP or
    # SMS gateway that delivers them to the device); empty: only the push channel
    omadm_notify_url: str = ""
    # how often a device's DevDetail is read again for the inventory
    omadm_inventory_interval_s: int = Field(default=6 * 3600, ge=0, le=30 * 86400)
    # the FUMO node of the fleet's devices: a plain-file package deployed to an OMA DM device
    # is a firmware image, sent to <node>/DownloadAndUpdate
    omadm_fumo_node: str = Field(
        default="./FUMO/Custos", pattern=r"^\./FUMO(/[A-Za-z0-9_.-]{1,64}){1,3}$"
    )
    # a session not continued within this time is forgotten
    omadm_session_ttl_s: int = Field(default=3600, ge=60, le=86400)
    # TLS-terminating proxies (CIDRs) allowed to pass a verified client certificate in
    # X-Client-Cert (nginx: $ssl_client_escaped_cert); they must overwrite that header
    omadm_cert_proxies: list[str] = Field(default_factory=list, max_length=100)
    # ask TLS clients for a certificate from the Custos CA (Windows-style DM clients prove
    # their identity with one); clients without a certificate are not affected
    omadm_client_certs: bool = True
    # a DMAcc rotation sends the new secrets in the message body: only over TLS (the endpoint
    # is https, or public_url is), unless this allows plain HTTP (test rigs only)
    omadm_rotate_over_http: bool = False

    # --- diagnostics (`diagnose` runs and OMA DM DiagMon reports)
    # how many reports each device keeps (older ones are pruned as new ones arrive), and the
    # largest report data stored, in JSON bytes (a larger one keeps its health numbers only)
    diagnostics_keep: int = Field(default=50, ge=1, le=10_000)
    diagnostics_max_bytes: int = Field(default=64 * 1024, ge=1024, le=4 * 1024 * 1024)
    # the nodes a `diagnose` run reads on an OMA DM device: node URI -> health field, with an
    # optional unit of its value (`mem_total:KB`); the first node a device has wins a field
    omadm_diagmon_nodes: dict[str, str] = Field(
        default_factory=lambda: _diagmon_defaults(), max_length=100
    )
    # a DiagMon procedure's Operations/Start node to Exec after the Gets ("": none); a
    # device that accepts it (202) finishes the run with an OperationComplete Generic Alert
    omadm_diagmon_start: str = Field(default="", pattern=r"^(\./[A-Za-z0-9_./-]{1,200})?$")

    @field_validator("port")
    @classmethod
    def _port_range(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError("port must be between 0 and 65535")
        return v

    @field_validator("trusted_proxies", "omadm_cert_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR") from None
        return v

    @field_validator("mqtt_url", "mqtt_device_url")
    @classmethod
    def _mqtt_url(cls, v: str | None) -> str | None:
        from custos.push.mqtt import parse_mqtt_url

        if v is not None:
            parse_mqtt_url(v)
        return v

    @field_validator("mqtt_topic_prefix")
    @classmethod
    def _mqtt_topic_prefix(cls, v: str) -> str:
        from custos.push.mqtt import check_topic_prefix

        return check_topic_prefix(v)

    @field_validator("omadm_diagmon_nodes")
    @classmethod
    def _diagmon_nodes(cls, v: dict[str, str]) -> dict[str, str]:
        from custos.omadm.diagmon import check_nodes

        return check_nodes(v)

    @model_validator(mode="after")
    def _mqtt_client_cert(self) -> Settings:
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ValueError("mqtt_cert_file and mqtt_key_file go together")
        return self

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


def _diagmon_defaults() -> dict[str, str]:
    from custos.omadm.diagmon import DEFAULT_NODES

    return dict(DEFAULT_NODES)
