"""The worker's settings: one frozen object, read from CLI flags and environment variables.

Every setting is declared once, as a field of :class:`Settings`: its type, its default, its environment
variable, its help text and its range (:func:`setting`). The flag is the field's name (``max_batch`` ->
``--max-batch``); the parser and the allowed values follow the type (``Literal`` choices, ``bool``,
numbers, paths; empty means "not set" for optional ones). :data:`SETTINGS` lists them, and ``worker run
--help``, the README table and the Helm chart's ConfigMap all follow it.

:meth:`Settings.from_env` and :func:`from_args` are the loader: they parse, read ``AMQP_URL_FILE``, check
the TLS files exist and derive a routed worker's queue. The constructor only validates the values it is
given, so :func:`dataclasses.replace` is a plain copy. Called by ``worker run`` (:mod:`worker.cli`), the
supervisor (which hands its settings to its consumer processes with :func:`to_env`) and the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from producer.amqp.tls import TlsOptions, is_tls_url
from producer.amqp.urls import read_url_file
from producer.wire.errors import BrokerTlsError
from producer.wire.names import (
    DEFAULT_AMQP_URL,
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE,
    DEFAULT_REPLY_TO_PATTERN,
    MAX_TRAFFIC_WEIGHT,
    QueueType,
    check_route_name,
    version_queue,
)
from worker.pipelines.config import Device, ModelConfig

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
Schedule = Literal["rows", "requests"]

DEFAULT_MODEL_PATH = "models/all-MiniLM-L6-v2"

_DECLARED = "setting"  # the key of a field's metadata that holds its declaration


class SettingsError(ValueError):
    """Raised when a setting is missing, malformed, out of range or conflicts with another."""


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


@dataclasses.dataclass(frozen=True)
class _Declared:
    env: str
    help: str
    parse: Callable[[str], Any] | None
    minimum: float | None
    maximum: float | None


def setting(
    default: Any,
    env: str,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    repr: bool = True,
) -> Any:
    """A :class:`Settings` field: its default, environment variable and help; numbers also their range.

    Args:
        default: the value when neither the flag nor the variable is given.
        env: the environment variable (``WORKER_...``, or ``AMQP_...`` for the broker connection).
        help: the flag's help text, also the README's description.
        parse: how the variable's text becomes a value; default: from the field's type.
        minimum: the smallest value allowed (with ``maximum``); None: no range.
        maximum: the largest value allowed.
        repr: False keeps the value out of ``repr`` (credentials).
    """
    declared = _Declared(env, help, parse, minimum, maximum)
    return dataclasses.field(default=default, repr=repr, metadata={_DECLARED: declared})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated worker settings. Build with :meth:`from_env` or :func:`from_args` (they read files)."""

    amqp_url: str = setting(DEFAULT_AMQP_URL, "AMQP_URL", "RabbitMQ URL, credentials included", repr=False)
    amqp_url_file: Path | None = setting(
        None,
        "AMQP_URL_FILE",
        "file holding the RabbitMQ URL, credentials included (e.g. a mounted Secret); instead of AMQP_URL",
    )
    ca_file: Path | None = setting(
        None,
        "AMQP_CA_FILE",
        "amqps:// only: PEM bundle of the CAs that may sign the broker's certificate (default: the system's)",
    )
    cert_file: Path | None = setting(
        None, "AMQP_CERT_FILE", "amqps:// only: PEM client certificate, for brokers that require one (mutual TLS)"
    )
    key_file: Path | None = setting(None, "AMQP_KEY_FILE", "amqps:// only: PEM private key of AMQP_CERT_FILE")
    tls_verify_hostname: bool = setting(
        True,
        "AMQP_TLS_VERIFY_HOSTNAME",
        "amqps:// only: check the broker's host name against its certificate; false is for test rigs only "
        "(logged as a warning)",
    )
    model: Path = setting(
        Path(DEFAULT_MODEL_PATH), "WORKER_MODEL", "ONNX model file, or a model folder with a manifest"
    )
    model_name: str = setting("", "WORKER_MODEL_NAME", "model name in replies (default: the file name)")
    model_version: str = setting("1", "WORKER_MODEL_VERSION", "model version in replies")
    queue: str = setting(DEFAULT_QUEUE, "WORKER_QUEUE", "request queue to consume (declared if missing)")
    traffic_weight: int | None = setting(
        None,
        "WORKER_TRAFFIC_WEIGHT",
        "serve version --model-version of model --model-name with this share of its unpinned requests, "
        "consuming queue model.NAME.vVERSION instead of --queue (0: pinned requests only; unset: --queue as before)",
        minimum=0,
        maximum=MAX_TRAFFIC_WEIGHT,
    )
    queue_type: QueueType = setting("quorum", "WORKER_QUEUE_TYPE", "request queue type")
    delivery_limit: int = setting(
        DEFAULT_DELIVERY_LIMIT,
        "WORKER_DELIVERY_LIMIT",
        "deliveries before a quorum queue dead-letters a message that keeps failing",
        minimum=1,
        maximum=1000,
    )
    max_batch: int = setting(
        DEFAULT_MAX_BATCH,
        "WORKER_MAX_BATCH",
        "most rows in one model run; larger requests get too_many_rows",
        minimum=1,
        maximum=65536,
    )
    max_delay_ms: float = setting(
        0.0,
        "WORKER_MAX_DELAY_MS",
        "longest a request may wait for a fuller batch while the model is idle (0: run at once)",
        minimum=0,
        maximum=10000,
    )
    prefetch: int = setting(
        256,
        "WORKER_PREFETCH",
        "unacknowledged requests the broker may hand this worker (the batching window)",
        minimum=1,
        maximum=65535,
    )
    device: Device = setting("auto", "WORKER_DEVICE", "where the model runs")
    device_id: int = setting(0, "WORKER_DEVICE_ID", "CUDA device ordinal", minimum=0, maximum=64)
    intra_op_threads: int = setting(
        0,
        "WORKER_INTRA_OP_THREADS",
        "ONNX Runtime intra-op threads (0: ONNX Runtime's default, one per core)",
        minimum=0,
        maximum=1024,
    )
    max_text_length: int = setting(
        256,
        "WORKER_MAX_TEXT_LENGTH",
        "text models: tokens per row, longer texts are truncated",
        minimum=8,
        maximum=8192,
    )
    group_by_length: bool = setting(
        True,
        "WORKER_GROUP_BY_LENGTH",
        "text models: batch texts of similar token length together (false: arrival order only)",
    )
    schedule: Schedule = setting(
        "rows",
        "WORKER_SCHEDULE",
        "what a batch is made of: rows (a request's rows may share model runs with other requests' rows) or "
        "requests (each request rides whole in one run)",
    )
    drain_timeout_s: float = setting(
        25.0,
        "WORKER_DRAIN_TIMEOUT_S",
        "on SIGTERM, how long to finish in-flight batches before handing the rest back",
        minimum=0,
        maximum=3600,
    )
    connect_timeout_s: float = setting(
        60.0,
        "WORKER_CONNECT_TIMEOUT_S",
        "how long to retry an unreachable broker at start before exiting non-zero",
        minimum=0,
        maximum=3600,
    )
    reply_hold_s: float = setting(
        60.0,
        "WORKER_REPLY_HOLD_S",
        "while the broker refuses a reply (e.g. a full results queue), how long to keep retrying it, with the "
        "request unacked, before handing the request back",
        minimum=0,
        maximum=3600,
    )
    max_message_bytes: int = setting(
        16 * 1024 * 1024,
        "WORKER_MAX_MESSAGE_BYTES",
        "largest request body accepted, checked before decoding; larger ones get message_too_large",
        minimum=1024,
        maximum=512 * 1024 * 1024,
    )
    max_text_bytes: int = setting(
        64 * 1024,
        "WORKER_MAX_TEXT_BYTES",
        "text models: largest text (UTF-8 bytes) accepted, checked before tokenizing; longer ones get text_too_long",
        minimum=64,
        maximum=64 * 1024 * 1024,
    )
    reply_to_pattern: str = setting(
        DEFAULT_REPLY_TO_PATTERN,
        "WORKER_REPLY_TO_PATTERN",
        "regular expression a reply_to queue name must match in full (direct reply-to is always accepted); "
        "requests with any other reply_to are dead-lettered unanswered",
    )
    stall_s: float = setting(
        60.0,
        "WORKER_STALL_S",
        "/readyz turns false when the prefetch window is full and nothing has settled for this long",
        minimum=1,
        maximum=86400,
    )
    http_port: int = setting(
        8080, "WORKER_HTTP_PORT", "port of /livez, /readyz and /metrics (0: no HTTP server)", minimum=0, maximum=65535
    )
    exit_when_idle: bool = setting(
        False, "WORKER_EXIT_WHEN_IDLE", "exit once the queue is empty and nothing is in flight (batch runs, tests)"
    )
    log_format: LogFormat = setting("auto", "WORKER_LOG_FORMAT", "log rendering (auto: console on a TTY, else JSON)")
    log_level: LogLevel = setting("info", "WORKER_LOG_LEVEL", "lowest level logged")
    processes: int = setting(
        1,
        "WORKER_PROCESSES",
        "consumer processes in this pod, each with its own connections and model session on the same device "
        "(auto or 0: the CPUs the container may use, from its cgroup quota)",
        parse=_processes,
        minimum=0,
        maximum=256,
    )
    restart_backoff_max_s: float = setting(
        30.0,
        "WORKER_RESTART_BACKOFF_MAX_S",
        "several processes: longest wait before a dead consumer process is started again (the wait doubles "
        "from 0.5 s with each death of that process in the death window)",
        minimum=0,
        maximum=3600,
    )
    max_deaths: int = setting(
        5,
        "WORKER_MAX_DEATHS",
        "several processes: consumer process deaths within the death window that make the supervisor drain the "
        "others and exit non-zero, so Kubernetes restarts the pod",
        minimum=1,
        maximum=10000,
    )
    death_window_s: float = setting(
        60.0,
        "WORKER_DEATH_WINDOW_S",
        "several processes: the window, in seconds, in which consumer process deaths are counted",
        minimum=1,
        maximum=86400,
    )

    def __post_init__(self) -> None:
        for spec in SETTINGS:
            spec.check(getattr(self, spec.field))
        try:
            re.compile(self.reply_to_pattern)
        except re.error as e:
            raise SettingsError(
                f"WORKER_REPLY_TO_PATTERN (--reply-to-pattern) is not a regular expression: {e}"
            ) from None
        if not is_tls_url(self.amqp_url) and self.tls.configured:
            raise SettingsError(
                "AMQP_CA_FILE, AMQP_CERT_FILE, AMQP_KEY_FILE or AMQP_TLS_VERIFY_HOSTNAME is set, but the broker URL "
                "is amqp:// (no TLS): use an amqps:// URL and the broker's TLS port (5671 by default)"
            )
        if self.routed:
            expected = _version_queue(self.model_name, self.model_version)
            if self.queue != expected:
                raise SettingsError(
                    f"a worker with WORKER_TRAFFIC_WEIGHT (--traffic-weight) consumes its version's queue {expected}, "
                    f"not WORKER_QUEUE (--queue) {self.queue!r}; Settings.from_env derives it"
                )

    @property
    def routed(self) -> bool:
        """True when the worker serves a version of a model's route (``traffic_weight`` is set)."""
        return self.traffic_weight is not None

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

    @property
    def model_config(self) -> ModelConfig:
        """What loading the model needs (see :func:`worker.pipelines.tensor.load_pipeline`)."""
        return ModelConfig(
            path=self.model,
            name=self.model_name,
            version=self.model_version,
            device=self.device,
            device_id=self.device_id,
            intra_op_threads=self.intra_op_threads,
            max_text_length=self.max_text_length,
            max_text_bytes=self.max_text_bytes,
            group_by_length=self.group_by_length,
            routed=self.routed,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from environment variables (``os.environ`` by default), then ``overrides``.

        Reads ``AMQP_URL_FILE`` into ``amqp_url``, checks the TLS files exist, and gives a routed worker
        (``traffic_weight`` set) its version's queue in place of ``queue``.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {spec.field: spec.parse(env[spec.env]) for spec in SETTINGS if spec.env in env}
        values.update(overrides)
        _read_broker_files(values)
        if values.get("traffic_weight") is not None:
            # The version queue replaces --queue; every reader of ``queue`` (consumer, logs) follows.
            with contextlib.suppress(SettingsError):  # the constructor says what is wrong, after the range checks
                values["queue"] = _version_queue(values.get("model_name", ""), values.get("model_version", "1"))
        return cls(**values)


def _read_broker_files(values: dict[str, Any]) -> None:
    """Read ``amqp_url_file`` into ``amqp_url``; check the TLS files exist (``values`` as :meth:`from_env` has them)."""
    url_file = values.get("amqp_url_file")
    if url_file is not None:
        try:
            from_file = read_url_file(url_file)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if values.get("amqp_url", DEFAULT_AMQP_URL) not in (DEFAULT_AMQP_URL, from_file):  # to_env's copy holds both
            raise SettingsError("AMQP_URL (--amqp-url) and AMQP_URL_FILE (--amqp-url-file) are both set; set one")
        values["amqp_url"] = from_file
    for spec in SETTINGS:
        path = values.get(spec.field) if spec.field in _TLS_FILE_FIELDS else None
        if path is not None and not path.is_file():
            raise SettingsError(f"{spec.env} ({spec.flag}) is {path}, which is not a readable file")


def _version_queue(model_name: str, model_version: str) -> str:
    """The queue of a routed worker: its model's version queue; both names must fit route names."""
    if not model_name:
        raise SettingsError(
            "WORKER_TRAFFIC_WEIGHT (--traffic-weight) needs WORKER_MODEL_NAME (--model-name): "
            "the route is named after the model"
        )
    try:
        check_route_name("WORKER_MODEL_NAME (--model-name)", model_name)
        check_route_name("WORKER_MODEL_VERSION (--model-version)", model_version)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    return version_queue(model_name, model_version)


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """How one setting is named, parsed, checked and documented (made from its field, see :func:`setting`)."""

    field: str
    env: str
    flag: str
    help: str
    default: Any
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


def _parser(kind: Any, env: str) -> Callable[[str], Any]:
    """How an environment variable's text becomes a value of a field's type."""
    if kind is bool:
        return _bool
    if kind in (int, float):
        return _number(kind, env)
    if kind == Path | None:
        return _path
    if kind == int | None:
        return _optional_int(env)
    if kind in (str, Path) or typing.get_origin(kind) is Literal:
        return kind if kind is Path else str
    raise TypeError(f"no parser for {env}'s type {kind}; pass parse=")


def _spec(field: dataclasses.Field[Any], kind: Any) -> SettingSpec:
    declared: _Declared = field.metadata[_DECLARED]
    return SettingSpec(
        field=field.name,
        env=declared.env,
        flag="--" + field.name.replace("_", "-"),
        help=declared.help,
        default=field.default,
        parse=declared.parse or _parser(kind, declared.env),
        choices=typing.get_args(kind) if typing.get_origin(kind) is Literal else None,
        minimum=declared.minimum,
        maximum=declared.maximum,
    )


_TLS_FILE_FIELDS = frozenset({"ca_file", "cert_file", "key_file"})

_TYPES = typing.get_type_hints(Settings)
SETTINGS: tuple[SettingSpec, ...] = tuple(_spec(f, _TYPES[f.name]) for f in dataclasses.fields(Settings))
"""Every setting, in the order ``--help`` and the README list them."""

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
