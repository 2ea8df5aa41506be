"""The node's configuration: one TOML file, validated at start-up; CLI flags override common keys.
Each destination kind parses its own ``[[destinations]]`` table (node.destinations)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from vesalius.inference.models.registry import ModelSpec, ModelSpecError, expand, parse_model_specs
from vesalius.node.checks import ConfigError, existing_file
from vesalius.node.checks import ae_title as _ae_title
from vesalius.node.checks import check_type as _check_type
from vesalius.node.checks import known as _known
from vesalius.node.checks import port as _port
from vesalius.node.checks import positive as _positive
from vesalius.node.checks import strings as _strings
from vesalius.node.destinations import Destination, parse_destination
from vesalius.node.destinations.dicom import DicomDestination
from vesalius.node.tls import ListenerTLS

DEFAULT_AE_TITLE = "VESALIUS"
DEFAULT_PORT = 11112
DEFAULT_HTTP_PORT = 8080
DEFAULT_HTTP_HOST = "127.0.0.1"  # HTTP answers only this machine unless configured otherwise
DEFAULT_DATA_DIR = "./vesalius-data"
DEFAULT_MODEL = "builtin_ct"


TRIGGERS = ("study", "series")
SELECTS = ("best", "all")
ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
CONTRASTS = ("any", "with", "without")
# Preference names a rule's ``prefer`` may list, best first (docs/routing.md).
PREFERENCES = ("axial", "coronal", "sagittal", "original", "soft_kernel", "thinnest", "thickest",
               "most_slices", "largest_coverage", "with_contrast", "without_contrast", "newest")
# Soft-tissue (standard) reconstruction kernels: Siemens B/Br/Bf/I/Q/H 10-49, GE STANDARD/SOFT,
# Philips A/B/C, Canon/Toshiba FC01-FC19. Lung and bone kernels (B70f, Bl57, LUNG, BONE, L, FC52,
# FC86...) do not match.
DEFAULT_SOFT_KERNEL = r"^([BIQH][a-z]{0,2}[1-4]\d[a-z]?|STANDARD|SOFT|SMOOTH|[ABC]|FC[01]\d)$"


@dataclass(frozen=True)
class Rule:
    """Which completed series become jobs: every given criterion must match (empty = any).

    A study-level rule (``trigger = "study"``) waits for the whole study and then takes one series
    by ``prefer`` (``select = "best"``) or every matching series (``"all"``); a series-level rule
    fires as each series completes."""

    name: str
    modality: tuple[str, ...] = ("CT",)
    sop_class: tuple[str, ...] = ()  # empty: any image class a model reads (CT, Enhanced CT, ...)
    series_description: str = ""  # regular expression, searched case-insensitively
    body_part: tuple[str, ...] = ()
    calling_ae: tuple[str, ...] = ()
    model: str = DEFAULT_MODEL
    destinations: tuple[str, ...] = ()  # names; empty = all destinations
    # --- study-level selection (issue 18) ---
    trigger: str = "study"
    select: str = "best"
    image_type: tuple[str, ...] = ()  # values that must all be in ImageType, e.g. ("ORIGINAL",)
    exclude_image_type: tuple[str, ...] = ("DERIVED", "SECONDARY", "LOCALIZER")  # any one excludes
    orientation: tuple[str, ...] = ()  # empty: any
    min_slice_thickness: float = 0.0
    max_slice_thickness: float = 0.0  # 0: no limit
    max_pixel_spacing: float = 0.0  # 0: no limit
    min_slices: int = 0
    min_coverage_mm: float = 0.0  # extent of the slice positions along the slice normal
    kernel: str = ""  # regular expression the ConvolutionKernel must match
    exclude_kernel: str = ""  # regular expression that excludes a kernel
    contrast: str = "any"  # with | without | any (ContrastBolusAgent given or not)
    prefer: tuple[str, ...] = ("axial", "original", "soft_kernel", "thinnest", "most_slices")
    soft_kernel: str = DEFAULT_SOFT_KERNEL  # what "soft_kernel" in prefer means


@dataclass(frozen=True)
class HttpToken:
    """A named bearer token for the HTTP API; the name (never the token) goes into logs and the
    audit trail. The secret is either in the file ``token_file`` (read at start-up) or ``token``."""

    name: str
    token_file: Path | None = None
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class Retry:
    """Delivery retries: exponential backoff from ``base_delay`` capped at ``max_delay``."""

    base_delay: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 12


@dataclass(frozen=True)
class Retention:
    """What `vesalius cleanup` and the node's periodic cleanup remove (node/retention.py).
    Days of 0 turn that age rule off; the high-water mark still applies."""

    spool_days: float = 7.0  # received series, after all deliveries of all their jobs are done
    results_days: float = 30.0  # a job's results, after all its deliveries are done
    unrouted_days: float = 7.0  # received series that no rule routed (stored only)
    free_space_high_water_mb: int = 1000  # below this free space, oldest eligible data goes first
    interval: float = 300.0  # s between the node's cleanups; 0: only `vesalius cleanup`


@dataclass(frozen=True)
class Config:
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    tls_port: int = 0  # the DICOM TLS listener's port; 0: none
    tls: ListenerTLS | None = None  # its certificate, key and client CAs ([tls])
    http_host: str = DEFAULT_HTTP_HOST
    http_port: int = DEFAULT_HTTP_PORT
    http_tokens: tuple[HttpToken, ...] = ()  # besides the generated data_dir/http.token ("local")
    metrics_public: bool = True  # /metrics without a token (Prometheus scrapers)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    allowed_calling_aes: tuple[str, ...] = ()  # "AE" or "AE@IP[/prefix]"; empty: any calling AE
    max_associations: int = 64  # concurrent associations (pynetdicom's own default is 10)
    max_associations_per_peer: int = 16  # per calling AE title and IP address
    idle_timeout: float = 60.0  # s without a PDU before an association is aborted
    max_pdu: int = 4 * 2**20  # bytes: the largest PDU we advertise and accept (docs/input.md)
    max_instance_mb: int = 2048  # a larger data set closes the association while it arrives
    min_free_disk_mb: int = 500  # below this free space in data_dir, instances are refused (A700)
    quiet_period: float = 1.0
    stability_timeout: float = 10.0
    study_quiet_period: float = 3.0  # s after a study's last association ended before it is complete
    workers: int = 1
    job_attempts: int = 2
    model: str = DEFAULT_MODEL
    models: dict[str, ModelSpec] = field(default_factory=dict)  # [[models]] by name (docs/models.md)
    gpu_jobs_per_device: int = 1  # jobs sharing one GPU at a time
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Rule, ...] = (Rule(name="ct"),)
    retry: Retry = field(default_factory=Retry)
    retention: Retention = field(default_factory=Retention)

    def destination_names(self, rule: Rule) -> tuple[str, ...]:
        return rule.destinations or tuple(d.name for d in self.destinations)


MIN_PDU, MAX_PDU = 4096, 256 * 2**20


def _allowed_ae(key: str, value: Any) -> str:
    """``AE`` or ``AE@IP`` or ``AE@IP/PREFIX`` (the AE title bound to a host or network)."""
    _check_type(key, value, str)
    ae, at, host = value.rpartition("@")
    if not at:
        return str(_ae_title(key, value))
    _ae_title(key, ae)
    try:
        ipaddress.ip_network(host, strict=False)
    except ValueError as err:
        raise ConfigError(f"{key}: expected AE or AE@IP or AE@IP/PREFIX, got {value!r} ({err})") from None
    return str(value)


def _tls(table: Any, base: Path | None) -> ListenerTLS:
    """The ``[tls]`` table of the TLS listener; relative files start at ``base``."""
    _check_type("tls", table, dict)
    _known("tls", table, {f.name for f in fields(ListenerTLS)})
    for required in ("certificate", "private_key"):
        if required not in table:
            raise ConfigError(f"tls.{required}: required for the TLS listener")
    require_client = _check_type("tls.require_client_certificate",
                                 table.get("require_client_certificate", True), bool)
    if require_client and "ca_certificates" not in table:
        raise ConfigError("tls.ca_certificates: required with require_client_certificate = true "
                          "(the CAs whose client certificates are trusted)")
    return ListenerTLS(
        certificate=existing_file("tls.certificate", table["certificate"], base),
        private_key=existing_file("tls.private_key", table["private_key"], base),
        ca_certificates=(existing_file("tls.ca_certificates", table["ca_certificates"], base)
                         if "ca_certificates" in table else None),
        require_client_certificate=require_client,
    )


def _retention(table: Any) -> Retention:
    _check_type("retention", table, dict)
    _known("retention", table, {f.name for f in fields(Retention)})
    values: dict[str, Any] = {}
    for key in ("spool_days", "results_days", "unrouted_days", "interval"):
        if key in table:
            value = _check_type(f"retention.{key}", table[key], (int, float))
            if value < 0:
                raise ConfigError(f"retention.{key}: must be >= 0, got {value}")
            values[key] = float(value)
    if "free_space_high_water_mb" in table:
        mark = _check_type("retention.free_space_high_water_mb", table["free_space_high_water_mb"], int)
        if mark < 0:
            raise ConfigError(f"retention.free_space_high_water_mb: must be >= 0, got {mark}")
        values["free_space_high_water_mb"] = mark
    return Retention(**values)


TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _http_token(i: int, table: Any, base: Path | None) -> HttpToken:
    key = f"http_tokens[{i}]"
    _check_type(key, table, dict)
    _known(key, table, {"name", "token", "token_file"})
    if "name" not in table:
        raise ConfigError(f"{key}.name: required (it names the token in logs and the audit trail)")
    name = _check_type(f"{key}.name", table["name"], str)
    if not TOKEN_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name: 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if ("token" in table) == ("token_file" in table):
        raise ConfigError(f"{key}: give exactly one of token_file (preferred) or token")
    if "token" in table:
        token = _check_type(f"{key}.token", table["token"], str)
        if len(token) < 16 or not token.isprintable() or " " in token:
            raise ConfigError(f"{key}.token: at least 16 printable characters without spaces")
        return HttpToken(name=name, token=token)
    path = Path(_check_type(f"{key}.token_file", table["token_file"], str))
    return HttpToken(name=name, token_file=path if path.is_absolute() or base is None else base / path)


def _rule(i: int, table: Any) -> Rule:
    key = f"rules[{i}]"
    _check_type(key, table, dict)
    _known(key, table, {f.name for f in fields(Rule)})
    values: dict[str, Any] = {"name": _check_type(f"{key}.name", table.get("name", f"rule{i}"), str)}
    for name in ("modality", "sop_class", "body_part", "calling_ae", "destinations"):
        if name in table:
            values[name] = _strings(f"{key}.{name}", table[name])
    if "series_description" in table:
        pattern = _check_type(f"{key}.series_description", table["series_description"], str)
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{key}.series_description: not a valid regular expression: {err}") from err
        values["series_description"] = pattern
    if "model" in table:
        values["model"] = _check_type(f"{key}.model", table["model"], str)
    values.update(_selection(key, table))
    return Rule(**values)


def _regex(key: str, value: Any) -> str:
    pattern = _check_type(key, value, str)
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{key}: not a valid regular expression: {err}") from err
    return str(pattern)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    _check_type(key, value, str)
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _selection(key: str, table: dict[str, Any]) -> dict[str, Any]:
    """A rule's study-level keys: trigger, select, series conditions and preferences."""
    values: dict[str, Any] = {}
    if "trigger" in table:
        values["trigger"] = _one_of(f"{key}.trigger", table["trigger"], TRIGGERS)
    if "select" in table:
        values["select"] = _one_of(f"{key}.select", table["select"], SELECTS)
    if values.get("trigger") == "series" and values.get("select", "best") == "best":
        raise ConfigError(f"{key}.select: a rule with trigger = \"series\" sees one series at a time; "
                          "set select = \"all\" (or trigger = \"study\" to choose the best series)")
    for name in ("image_type", "exclude_image_type"):
        if name in table:
            values[name] = tuple(v.upper() for v in _strings(f"{key}.{name}", table[name]))
    for name, allowed in (("orientation", ORIENTATIONS), ("prefer", PREFERENCES)):
        if name in table:
            values[name] = tuple(_one_of(f"{key}.{name}[{i}]", v, allowed)
                                 for i, v in enumerate(_strings(f"{key}.{name}", table[name])))
    for name in ("min_slice_thickness", "max_slice_thickness", "max_pixel_spacing", "min_coverage_mm"):
        if name in table:
            values[name] = float(_check_type(f"{key}.{name}", table[name], (int, float)))
            if values[name] < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {table[name]}")
    if "min_slices" in table:
        values["min_slices"] = _check_type(f"{key}.min_slices", table["min_slices"], int)
        if values["min_slices"] < 0:
            raise ConfigError(f"{key}.min_slices: must be >= 0, got {values['min_slices']}")
    for name in ("kernel", "exclude_kernel", "soft_kernel"):
        if name in table:
            values[name] = _regex(f"{key}.{name}", table[name])
    if "contrast" in table:
        values["contrast"] = _one_of(f"{key}.contrast", table["contrast"], CONTRASTS)
    return values


def parse_config(data: dict[str, Any], base: Path | None = None) -> Config:
    """A Config from a parsed TOML table; raises ConfigError naming the offending key.
    Relative model paths are taken from ``base`` (the config file's folder)."""
    top = {f.name for f in fields(Config)}
    _known("", data, top)
    values: dict[str, Any] = {}
    if "ae_title" in data:
        values["ae_title"] = _ae_title("ae_title", data["ae_title"])
    for key in ("host", "http_host"):
        if key in data:
            values[key] = _check_type(key, data[key], str)
    if "metrics_public" in data:
        values["metrics_public"] = _check_type("metrics_public", data["metrics_public"], bool)
    if "http_tokens" in data:
        tokens = tuple(_http_token(i, t, base) for i, t in enumerate(
            _check_type("http_tokens", data["http_tokens"], list)))
        names = [t.name for t in tokens]
        if len(set(names)) != len(names) or "local" in names:
            raise ConfigError(f"http_tokens: names must be unique and not 'local' (the generated "
                              f"token's), got {names}")
        values["http_tokens"] = tokens
    for key in ("port", "tls_port", "http_port"):
        if key in data:
            values[key] = _port(key, data[key])
    if "data_dir" in data:
        values["data_dir"] = Path(_check_type("data_dir", data["data_dir"], str))
    if "allowed_calling_aes" in data:
        aes = _strings("allowed_calling_aes", data["allowed_calling_aes"])
        values["allowed_calling_aes"] = tuple(_allowed_ae(f"allowed_calling_aes[{i}]", a)
                                              for i, a in enumerate(aes))
    for key in ("max_associations", "max_associations_per_peer", "max_instance_mb"):
        if key in data:
            values[key] = int(_positive(key, _check_type(key, data[key], int)))
    if "idle_timeout" in data:
        values["idle_timeout"] = _positive("idle_timeout", data["idle_timeout"])
    if "max_pdu" in data:
        values["max_pdu"] = _check_type("max_pdu", data["max_pdu"], int)
        if not MIN_PDU <= values["max_pdu"] <= MAX_PDU:
            raise ConfigError(f"max_pdu: must be {MIN_PDU}-{MAX_PDU} bytes (a finite maximum bounds "
                              f"the memory one peer can use), got {values['max_pdu']}")
    if "min_free_disk_mb" in data:
        values["min_free_disk_mb"] = _check_type("min_free_disk_mb", data["min_free_disk_mb"], int)
        if values["min_free_disk_mb"] < 0:
            raise ConfigError(f"min_free_disk_mb: must be >= 0, got {values['min_free_disk_mb']}")
    for key in ("quiet_period", "stability_timeout", "study_quiet_period"):
        if key in data:
            values[key] = _positive(key, data[key])
    for key in ("workers", "job_attempts"):
        if key in data:
            values[key] = int(_positive(key, _check_type(key, data[key], int)))
    if "model" in data:
        values["model"] = _check_type("model", data["model"], str)
    if "models" in data:
        try:
            values["models"] = parse_model_specs(_check_type("models", data["models"], list), base=base)
        except ModelSpecError as err:
            raise ConfigError(str(err)) from None
    if "gpu_jobs_per_device" in data:
        count = _check_type("gpu_jobs_per_device", data["gpu_jobs_per_device"], int)
        values["gpu_jobs_per_device"] = int(_positive("gpu_jobs_per_device", count))
    if "destinations" in data:
        tables = _check_type("destinations", data["destinations"], list)
        dests = tuple(parse_destination(f"destinations[{i}]", t, base) for i, t in enumerate(tables))
        names = [d.name for d in dests]
        if len(set(names)) != len(names):
            raise ConfigError(f"destinations: names must be unique, got {names}")
        values["destinations"] = dests
    if "rules" in data:
        values["rules"] = tuple(_rule(i, t) for i, t in enumerate(_check_type("rules", data["rules"], list)))
    elif "model" in values:  # the default rule runs the configured model
        values["rules"] = (Rule(name="ct", model=values["model"]),)
    if "retry" in data:
        table = _check_type("retry", data["retry"], dict)
        _known("retry", table, {f.name for f in fields(Retry)})
        retry = Retry()
        for key in ("base_delay", "max_delay"):
            if key in table:
                retry = replace(retry, **{key: _positive(f"retry.{key}", table[key])})  # type: ignore[arg-type]
        if "max_attempts" in table:
            attempts = _check_type("retry.max_attempts", table["max_attempts"], int)
            retry = replace(retry, max_attempts=int(_positive("retry.max_attempts", attempts)))
        values["retry"] = retry
    if "tls" in data:
        values["tls"] = _tls(data["tls"], base)
    if values.get("tls_port") and "tls" not in values:
        raise ConfigError("tls_port: the TLS listener needs a [tls] table with certificate and private_key")
    if "tls" in values and not values.get("tls_port"):
        raise ConfigError("tls: set tls_port to start the TLS listener")
    if values.get("tls_port") and values["tls_port"] == values.get("port", DEFAULT_PORT):
        raise ConfigError(f"tls_port: must differ from port ({values['tls_port']})")
    if "retention" in data:
        values["retention"] = _retention(data["retention"])
    config = Config(**values)
    _check_references(config)
    return config


def _check_references(config: Config) -> None:
    known = {d.name for d in config.destinations}
    for i, rule in enumerate(config.rules):
        try:
            expand(rule.model, config.models)
        except ModelSpecError as err:
            raise ConfigError(f"rules[{i}].model: {err}") from None
        for name in rule.destinations:
            if name not in known:
                raise ConfigError(f"rules[{i}].destinations: unknown destination {name!r} "
                                  f"(configured: {', '.join(sorted(known)) or 'none'})")


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config file; no file means the embedded defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path}: not found") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: not valid TOML: {err}") from err
    return parse_config(data, base=Path(path).parent)


def config_digest(config: Config) -> str:
    """sha256 of the configuration as canonical JSON (sorted keys), for the audit trail's start
    event; inline token secrets are left out, so the digest reveals nothing about them."""
    def plain(value: Any) -> Any:
        if isinstance(value, HttpToken):
            return {"name": value.name, "token_file": str(value.token_file) if value.token_file else None}
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)

    text = json.dumps(plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def with_overrides(config: Config, **flags: Any) -> Config:
    """Apply command-line flags (None = not given) over the file's values."""
    values = {k: v for k, v in flags.items() if v is not None and k != "destinations"}
    if "ae_title" in values:
        _ae_title("--ae-title", values["ae_title"])
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    extra = tuple(DicomDestination.parse(d) for d in flags.get("destinations") or ())
    if extra:
        values["destinations"] = config.destinations + extra
    updated = replace(config, **values)
    if "model" in values:  # --model applies to every rule
        updated = replace(updated, rules=tuple(replace(r, model=values["model"]) for r in updated.rules))
    return updated
