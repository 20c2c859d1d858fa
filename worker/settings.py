"""The worker's settings: one frozen object, read from CLI flags and environment variables.

Every setting is declared once in :data:`SETTINGS`: its environment variable, its flag, its
default, its allowed values and its help text. ``worker run --help``, the README table and the
Helm chart's ConfigMap all follow this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from producer.amqp.tls import TlsOptions, is_tls_url
from producer.amqp.urls import read_url_file
from producer.wire.errors import BrokerTlsError
from producer.wire.names import (
    DEFAULT_AMQP_URL,
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_QUEUE,
    DEFAULT_REPLY_TO_PATTERN,
    MAX_TRAFFIC_WEIGHT,
    check_route_name,
    version_queue,
)

Device = Literal["auto", "cpu", "cuda"]
LogFormat = Literal["auto", "json", "console"]
Schedule = Literal["rows", "requests"]

DEFAULT_MODEL_PATH = "models/all-MiniLM-L6-v2"


class SettingsError(ValueError):
    """Raised when a setting is missing, malformed, out of range or conflicts with another."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated worker settings. Build with :meth:`from_env` or :func:`parse_args`."""

    amqp_url: str = dataclasses.field(default=DEFAULT_AMQP_URL, repr=False)
    amqp_url_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_verify_hostname: bool = True
    model: Path = Path(DEFAULT_MODEL_PATH)
    model_name: str = ""
    model_version: str = "1"
    queue: str = DEFAULT_QUEUE
    traffic_weight: int | None = None
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    max_batch: int = 64
    max_delay_ms: float = 0.0
    prefetch: int = 256
    device: Device = "auto"
    device_id: int = 0
    intra_op_threads: int = 0
    max_text_length: int = 256
    group_by_length: bool = True
    schedule: Schedule = "rows"
    drain_timeout_s: float = 25.0
    connect_timeout_s: float = 60.0
    reply_hold_s: float = 60.0
    max_message_bytes: int = 16 * 1024 * 1024
    max_text_bytes: int = 64 * 1024
    reply_to_pattern: str = DEFAULT_REPLY_TO_PATTERN
    stall_s: float = 60.0
    http_port: int = 8080
    exit_when_idle: bool = False
    log_format: LogFormat = "auto"
    log_level: str = "info"
    processes: int = 1
    restart_backoff_max_s: float = 30.0
    max_deaths: int = 5
    death_window_s: float = 60.0

    def __post_init__(self) -> None:
        for spec in SETTINGS:
            spec.check(getattr(self, spec.field))
        if self.prefetch < 1:
            raise SettingsError("WORKER_PREFETCH (--prefetch) must be at least 1")
        self._check_broker()
        try:
            re.compile(self.reply_to_pattern)
        except re.error as e:
            raise SettingsError(
                f"WORKER_REPLY_TO_PATTERN (--reply-to-pattern) is not a regular expression: {e}"
            ) from None
        if self.traffic_weight is not None:
            self._route_version()

    def _route_version(self) -> None:
        """With a traffic weight the worker serves one version of a model's route: its queue is derived."""
        if not self.model_name:
            raise SettingsError(
                "WORKER_TRAFFIC_WEIGHT (--traffic-weight) needs WORKER_MODEL_NAME (--model-name): "
                "the route is named after the model"
            )
        try:
            check_route_name("WORKER_MODEL_NAME (--model-name)", self.model_name)
            check_route_name("WORKER_MODEL_VERSION (--model-version)", self.model_version)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        # The version queue replaces --queue; every reader of ``queue`` (consumer, logs) follows.
        object.__setattr__(self, "queue", version_queue(self.model_name, self.model_version))

    @property
    def routed(self) -> bool:
        """True when the worker serves a version of a model's route (``traffic_weight`` is set)."""
        return self.traffic_weight is not None

    def _check_broker(self) -> None:
        """Read ``amqp_url_file`` into ``amqp_url``; check the TLS files exist and fit the URL."""
        if self.amqp_url_file is not None:
            try:
                from_file = read_url_file(self.amqp_url_file)
            except ValueError as e:
                raise SettingsError(str(e)) from None
            if self.amqp_url not in (DEFAULT_AMQP_URL, from_file):  # a copy (dataclasses.replace) holds both
                raise SettingsError("AMQP_URL (--amqp-url) and AMQP_URL_FILE (--amqp-url-file) are both set; set one")
            object.__setattr__(self, "amqp_url", from_file)
        for spec in SETTINGS:
            if spec.field in _TLS_FILE_FIELDS:
                path = getattr(self, spec.field)
                if path is not None and not path.is_file():
                    raise SettingsError(f"{spec.env} ({spec.flag}) is {path}, which is not a readable file")
        if not is_tls_url(self.amqp_url) and self.tls.configured:
            raise SettingsError(
                "AMQP_CA_FILE, AMQP_CERT_FILE, AMQP_KEY_FILE or AMQP_TLS_VERIFY_HOSTNAME is set, but the broker URL "
                "is amqp:// (no TLS): use an amqps:// URL and the broker's TLS port (5671 by default)"
            )

    @property
    def tls(self) -> TlsOptions:
        """How to connect over TLS when the URL is ``amqps://``."""
        try:
            return TlsOptions(
                ca_file=self.ca_file,
                cert_file=self.cert_file,
                key_file=self.key_file,
                verify_hostname=self.tls_verify_hostname,
            )
        except BrokerTlsError as e:
            raise SettingsError(str(e)) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from environment variables (``os.environ`` by default), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in SETTINGS:
            if spec.env in env:
                values[spec.field] = spec.parse(env[spec.env])
        values.update(overrides)
        return cls(**values)

    @property
    def resolved_model_name(self) -> str:
        """The model name replies carry: ``model_name`` or the model file's stem."""
        if self.model_name:
            return self.model_name
        return self.model.name if self.model.is_dir() else self.model.stem


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """How one setting is named, parsed, checked and documented."""

    field: str
    env: str
    flag: str
    help: str
    parse: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any) -> None:
        name = f"{self.env} ({self.flag})"
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise SettingsError(f"{name} is {value!r}; allowed: {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise SettingsError(f"{name} is {value}; it must be between {self.minimum:g} and {self.maximum:g}")
        if self.maximum is not None and value > self.maximum:
            raise SettingsError(f"{name} is {value}; it must be between {self.minimum:g} and {self.maximum:g}")

    @property
    def default(self) -> Any:
        return next(f.default for f in dataclasses.fields(Settings) if f.name == self.field)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{text!r} is not a boolean; use true or false")


def _processes(text: str) -> int:
    """``auto`` (any case) is 0: the supervisor resolves it to the CPUs the container may use."""
    if text.strip().lower() == "auto":
        return 0
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"WORKER_PROCESSES is {text!r}; use a number of processes or auto") from None


def _optional_int(env: str) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if not text.strip():
            return None
        try:
            return int(text)
        except ValueError:
            raise SettingsError(f"{env} is {text!r}, which is not an int (empty: not set)") from None

    return parse


def _path(text: str) -> Path | None:
    return Path(text) if text.strip() else None


def _number(kind: Callable[[str], Any], env: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise SettingsError(f"{env} is {text!r}, which is not a {kind.__name__}") from None

    return parse


_TLS_FILE_FIELDS = frozenset({"ca_file", "cert_file", "key_file"})

SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("amqp_url", "AMQP_URL", "--amqp-url", "RabbitMQ URL, credentials included"),
    SettingSpec(
        "amqp_url_file",
        "AMQP_URL_FILE",
        "--amqp-url-file",
        "file holding the RabbitMQ URL, credentials included (e.g. a mounted Secret); instead of AMQP_URL",
        _path,
    ),
    SettingSpec(
        "ca_file",
        "AMQP_CA_FILE",
        "--ca-file",
        "amqps:// only: PEM bundle of the CAs that may sign the broker's certificate (default: the system's)",
        _path,
    ),
    SettingSpec(
        "cert_file",
        "AMQP_CERT_FILE",
        "--cert-file",
        "amqps:// only: PEM client certificate, for brokers that require one (mutual TLS)",
        _path,
    ),
    SettingSpec("key_file", "AMQP_KEY_FILE", "--key-file", "amqps:// only: PEM private key of AMQP_CERT_FILE", _path),
    SettingSpec(
        "tls_verify_hostname",
        "AMQP_TLS_VERIFY_HOSTNAME",
        "--tls-verify-hostname",
        "amqps:// only: check the broker's host name against its certificate; false is for test rigs only "
        "(logged as a warning)",
        _bool,
    ),
    SettingSpec("model", "WORKER_MODEL", "--model", "ONNX model file, or a model folder with a manifest", Path),
    SettingSpec("model_name", "WORKER_MODEL_NAME", "--model-name", "model name in replies (default: the file name)"),
    SettingSpec("model_version", "WORKER_MODEL_VERSION", "--model-version", "model version in replies"),
    SettingSpec("queue", "WORKER_QUEUE", "--queue", "request queue to consume (declared if missing)"),
    SettingSpec(
        "traffic_weight",
        "WORKER_TRAFFIC_WEIGHT",
        "--traffic-weight",
        "serve version --model-version of model --model-name with this share of its unpinned requests, "
        "consuming queue model.NAME.vVERSION instead of --queue (0: pinned requests only; unset: --queue as before)",
        _optional_int("WORKER_TRAFFIC_WEIGHT"),
        minimum=0,
        maximum=MAX_TRAFFIC_WEIGHT,
    ),
    SettingSpec("queue_type", "WORKER_QUEUE_TYPE", "--queue-type", "request queue type", choices=("quorum", "classic")),
    SettingSpec(
        "delivery_limit",
        "WORKER_DELIVERY_LIMIT",
        "--delivery-limit",
        "deliveries before a quorum queue dead-letters a message that keeps failing",
        _number(int, "WORKER_DELIVERY_LIMIT"),
        minimum=1,
        maximum=1000,
    ),
    SettingSpec(
        "max_batch",
        "WORKER_MAX_BATCH",
        "--max-batch",
        "most rows in one model run; larger requests get too_many_rows",
        _number(int, "WORKER_MAX_BATCH"),
        minimum=1,
        maximum=65536,
    ),
    SettingSpec(
        "max_delay_ms",
        "WORKER_MAX_DELAY_MS",
        "--max-delay-ms",
        "longest a request may wait for a fuller batch while the model is idle (0: run at once)",
        _number(float, "WORKER_MAX_DELAY_MS"),
        minimum=0,
        maximum=10000,
    ),
    SettingSpec(
        "prefetch",
        "WORKER_PREFETCH",
        "--prefetch",
        "unacknowledged requests the broker may hand this worker (the batching window)",
        _number(int, "WORKER_PREFETCH"),
        minimum=1,
        maximum=65535,
    ),
    SettingSpec("device", "WORKER_DEVICE", "--device", "where the model runs", choices=("auto", "cpu", "cuda")),
    SettingSpec(
        "device_id",
        "WORKER_DEVICE_ID",
        "--device-id",
        "CUDA device ordinal",
        _number(int, "WORKER_DEVICE_ID"),
        minimum=0,
        maximum=64,
    ),
    SettingSpec(
        "intra_op_threads",
        "WORKER_INTRA_OP_THREADS",
        "--intra-op-threads",
        "ONNX Runtime intra-op threads (0: ONNX Runtime's default, one per core)",
        _number(int, "WORKER_INTRA_OP_THREADS"),
        minimum=0,
        maximum=1024,
    ),
    SettingSpec(
        "max_text_length",
        "WORKER_MAX_TEXT_LENGTH",
        "--max-text-length",
        "text models: tokens per row, longer texts are truncated",
        _number(int, "WORKER_MAX_TEXT_LENGTH"),
        minimum=8,
        maximum=8192,
    ),
    SettingSpec(
        "group_by_length",
        "WORKER_GROUP_BY_LENGTH",
        "--group-by-length",
        "text models: batch texts of similar token length together (false: arrival order only)",
        _bool,
    ),
    SettingSpec(
        "schedule",
        "WORKER_SCHEDULE",
        "--schedule",
        "what a batch is made of: rows (a request's rows may share model runs with other requests' rows) or "
        "requests (each request rides whole in one run)",
        choices=("rows", "requests"),
    ),
    SettingSpec(
        "drain_timeout_s",
        "WORKER_DRAIN_TIMEOUT_S",
        "--drain-timeout-s",
        "on SIGTERM, how long to finish in-flight batches before handing the rest back",
        _number(float, "WORKER_DRAIN_TIMEOUT_S"),
        minimum=0,
        maximum=3600,
    ),
    SettingSpec(
        "connect_timeout_s",
        "WORKER_CONNECT_TIMEOUT_S",
        "--connect-timeout-s",
        "how long to retry an unreachable broker at start before exiting non-zero",
        _number(float, "WORKER_CONNECT_TIMEOUT_S"),
        minimum=0,
        maximum=3600,
    ),
    SettingSpec(
        "reply_hold_s",
        "WORKER_REPLY_HOLD_S",
        "--reply-hold-s",
        "while the broker refuses a reply (e.g. a full results queue), how long to keep retrying it, with the "
        "request unacked, before handing the request back",
        _number(float, "WORKER_REPLY_HOLD_S"),
        minimum=0,
        maximum=3600,
    ),
    SettingSpec(
        "max_message_bytes",
        "WORKER_MAX_MESSAGE_BYTES",
        "--max-message-bytes",
        "largest request body accepted, checked before decoding; larger ones get message_too_large",
        _number(int, "WORKER_MAX_MESSAGE_BYTES"),
        minimum=1024,
        maximum=512 * 1024 * 1024,
    ),
    SettingSpec(
        "max_text_bytes",
        "WORKER_MAX_TEXT_BYTES",
        "--max-text-bytes",
        "text models: largest text (UTF-8 bytes) accepted, checked before tokenizing; longer ones get text_too_long",
        _number(int, "WORKER_MAX_TEXT_BYTES"),
        minimum=64,
        maximum=64 * 1024 * 1024,
    ),
    SettingSpec(
        "reply_to_pattern",
        "WORKER_REPLY_TO_PATTERN",
        "--reply-to-pattern",
        "regular expression a reply_to queue name must match in full (direct reply-to is always accepted); "
        "requests with any other reply_to are dead-lettered unanswered",
    ),
    SettingSpec(
        "stall_s",
        "WORKER_STALL_S",
        "--stall-s",
        "/readyz turns false when the prefetch window is full and nothing has settled for this long",
        _number(float, "WORKER_STALL_S"),
        minimum=1,
        maximum=86400,
    ),
    SettingSpec(
        "http_port",
        "WORKER_HTTP_PORT",
        "--http-port",
        "port of /livez, /readyz and /metrics (0: no HTTP server)",
        _number(int, "WORKER_HTTP_PORT"),
        minimum=0,
        maximum=65535,
    ),
    SettingSpec(
        "exit_when_idle",
        "WORKER_EXIT_WHEN_IDLE",
        "--exit-when-idle",
        "exit once the queue is empty and nothing is in flight (batch runs, tests)",
        _bool,
    ),
    SettingSpec(
        "log_format",
        "WORKER_LOG_FORMAT",
        "--log-format",
        "log rendering (auto: console on a TTY, else JSON)",
        choices=("auto", "json", "console"),
    ),
    SettingSpec(
        "log_level",
        "WORKER_LOG_LEVEL",
        "--log-level",
        "lowest level logged",
        choices=("debug", "info", "warning", "error"),
    ),
    SettingSpec(
        "processes",
        "WORKER_PROCESSES",
        "--processes",
        "consumer processes in this pod, each with its own connections and model session on the same device "
        "(auto or 0: the CPUs the container may use, from its cgroup quota)",
        _processes,
        minimum=0,
        maximum=256,
    ),
    SettingSpec(
        "restart_backoff_max_s",
        "WORKER_RESTART_BACKOFF_MAX_S",
        "--restart-backoff-max-s",
        "several processes: longest wait before a dead consumer process is started again (the wait doubles "
        "from 0.5 s with each death of that process in the death window)",
        _number(float, "WORKER_RESTART_BACKOFF_MAX_S"),
        minimum=0,
        maximum=3600,
    ),
    SettingSpec(
        "max_deaths",
        "WORKER_MAX_DEATHS",
        "--max-deaths",
        "several processes: consumer process deaths within the death window that make the supervisor drain the "
        "others and exit non-zero, so Kubernetes restarts the pod",
        _number(int, "WORKER_MAX_DEATHS"),
        minimum=1,
        maximum=10000,
    ),
    SettingSpec(
        "death_window_s",
        "WORKER_DEATH_WINDOW_S",
        "--death-window-s",
        "several processes: the window, in seconds, in which consumer process deaths are counted",
        _number(float, "WORKER_DEATH_WINDOW_S"),
        minimum=1,
        maximum=86400,
    ),
)

ENV_VARS: frozenset[str] = frozenset(spec.env for spec in SETTINGS)


def to_env(settings: Settings) -> dict[str, str]:
    """Every setting of ``settings`` as the environment variables that read back to the same values."""
    env: dict[str, str] = {}
    for spec in SETTINGS:
        value = getattr(settings, spec.field)
        if isinstance(value, bool):
            env[spec.env] = "true" if value else "false"
        else:
            env[spec.env] = "" if value is None else str(value)  # empty reads back as "not set"
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; flags default to None so the environment can fill the gaps."""
    for spec in SETTINGS:
        extra = f"; env {spec.env}; default {spec.default}"
        if spec.parse is _bool:
            parser.add_argument(
                spec.flag, dest=spec.field, action=argparse.BooleanOptionalAction, default=None, help=spec.help + extra
            )
        else:
            parser.add_argument(
                spec.flag,
                dest=spec.field,
                type=spec.parse,
                choices=spec.choices,
                default=None,
                metavar=spec.field.upper() if spec.choices is None else None,
                help=spec.help + extra,
            )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags; flags win over environment variables."""
    overrides = {
        spec.field: getattr(args, spec.field) for spec in SETTINGS if getattr(args, spec.field, None) is not None
    }
    return Settings.from_env(env, **overrides)
