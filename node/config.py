"""The node's configuration: one TOML file, validated at start-up; CLI flags override common keys.

Every section is a frozen dataclass that checks itself: ``inference.fields`` checks each value
against the field's annotation (and ``from_table`` refuses unknown keys), ``__post_init__`` adds
what types cannot say. A new key is a new typed field (plus its check, if types do not say it all).
Each destination kind is such a dataclass too (node.destinations)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from vesalius.inference.fields import FieldError, check_types, from_table
from vesalius.inference.models.registry import ModelSpec, expand, parse_model_specs
from vesalius.node.checks import ConfigError, ae_title, not_negative, one_of, port, positive, regex, under
from vesalius.node.destinations import Destination, parse_destination
from vesalius.node.destinations.dicom import DicomDestination
from vesalius.node.sources import Source, parse_source
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

    def __post_init__(self) -> None:
        check_types(self)
        one_of("trigger", self.trigger, TRIGGERS)
        one_of("select", self.select, SELECTS)
        if self.trigger == "series" and self.select == "best":
            raise FieldError("select: a rule with trigger = \"series\" sees one series at a time; "
                             "set select = \"all\" (or trigger = \"study\" to choose the best series)")
        for name in ("image_type", "exclude_image_type"):
            object.__setattr__(self, name, tuple(v.upper() for v in getattr(self, name)))
        for name, allowed in (("orientation", ORIENTATIONS), ("prefer", PREFERENCES)):
            for i, value in enumerate(getattr(self, name)):
                one_of(f"{name}[{i}]", value, allowed)
        for name in ("min_slice_thickness", "max_slice_thickness", "max_pixel_spacing", "min_coverage_mm",
                     "min_slices"):
            not_negative(name, getattr(self, name))
        for name in ("series_description", "kernel", "exclude_kernel", "soft_kernel"):
            regex(name, getattr(self, name))
        one_of("contrast", self.contrast, CONTRASTS)


@dataclass(frozen=True)
class HttpToken:
    """A named bearer token for the HTTP API; the name (never the token) goes into logs and the
    audit trail. The secret is either in the file ``token_file`` (read at start-up) or ``token``."""

    name: str
    token_file: Path | None = None
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        check_types(self)
        if not TOKEN_NAME.fullmatch(self.name):
            raise FieldError(f"name: 1-64 letters, digits, '.', '_' or '-', got {self.name!r}")
        if bool(self.token) == (self.token_file is not None):
            raise FieldError(": give exactly one of token_file (preferred) or token")
        if self.token and (len(self.token) < 16 or not self.token.isprintable() or " " in self.token):
            raise FieldError("token: at least 16 printable characters without spaces")


@dataclass(frozen=True)
class Retry:
    """Delivery retries: exponential backoff from ``base_delay`` capped at ``max_delay``."""

    base_delay: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 12

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("base_delay", "max_delay", "max_attempts"):
            positive(name, getattr(self, name))


@dataclass(frozen=True)
class Retention:
    """What `vesalius cleanup` and the node's periodic cleanup remove (node/retention.py).
    Days of 0 turn that age rule off; the high-water mark still applies."""

    spool_days: float = 7.0  # received series, after all deliveries of all their jobs are done
    results_days: float = 30.0  # a job's results, after all its deliveries are done
    unrouted_days: float = 7.0  # received series that no rule routed (stored only)
    free_space_high_water_mb: int = 1000  # below this free space, oldest eligible data goes first
    interval: float = 300.0  # s between the node's cleanups; 0: only `vesalius cleanup`

    def __post_init__(self) -> None:
        check_types(self)
        for f in fields(self):
            not_negative(f.name, getattr(self, f.name))


@dataclass(frozen=True)
class Learning:
    """Corrections coming back and the case library (docs/learning.md)."""

    corrections: bool = True  # recognise received SEGs that correct our jobs, and score them
    case_library: bool = True  # each recognised correction becomes a de-identified case (data_dir/cases)
    longitudinal: bool = True  # keep each structure's volume per pseudonymous patient; priors in the SR

    def __post_init__(self) -> None:
        check_types(self)


@dataclass(frozen=True)
class Database:
    """Where the node's state lives (node/store.py, node/database.py): SQLite in data_dir, or one
    PostgreSQL that several listeners share. The password comes from libpq's PGPASSWORD or
    ~/.pgpass rather than the URL (a URL's password is never logged)."""

    url: str = ""  # "": SQLite in data_dir; "postgresql://user@host:port/dbname": shared PostgreSQL

    def __post_init__(self) -> None:
        check_types(self)
        if self.url and not re.fullmatch(r"postgres(ql)?://\S+", self.url):
            raise FieldError(f"url: expected \"\" (SQLite in data_dir) or a postgresql:// URL, got "
                             f"{self.url.split('://')[0]!r}://...")


@dataclass(frozen=True)
class Dashboard:
    """The web page the node serves at / (node/api/dashboard.py, docs/dashboard.md)."""

    ohif_url: str = ""  # OHIF Viewer's base URL: the job page links /viewer?StudyInstanceUIDs=...; "" none

    def __post_init__(self) -> None:
        check_types(self)
        if self.ohif_url and not re.fullmatch(r"https?://[^\s\"'<>]+", self.ohif_url):
            raise FieldError(f"ohif_url: expected an http(s):// URL, got {self.ohif_url!r}")


@dataclass(frozen=True)
class Ray:
    """Pipeline runs on a Ray cluster (node/ray_runner.py, docs/scale-out.md); address "" = the
    local worker processes (the embedded default, which never imports Ray)."""

    address: str = ""  # "host:port" of the cluster's head (GCS), e.g. "ray-head:6379"
    cpu_actors: int = -1  # model workers of 1 CPU each; -1: `workers` if there is no GPU actor, else 0
    gpu_actors: int = -1  # model workers placed by 1 GPU (and 1 CPU) each; -1: one per GPU of the cluster

    def __post_init__(self) -> None:
        check_types(self)
        if self.address and not re.fullmatch(r"[A-Za-z0-9.-]+:\d{1,5}", self.address):
            raise FieldError(f"address: expected \"host:port\" of the Ray head, got {self.address!r}")
        for name in ("cpu_actors", "gpu_actors"):
            if getattr(self, name) < -1:
                raise FieldError(f"{name}: -1 (automatic) or a count, got {getattr(self, name)}")


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
    # a series sent in one association that ended with a normal release is complete at once
    # (node/series.py); false: it waits quiet_period like a series sent over several
    complete_on_release: bool = True
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
    learning: Learning = field(default_factory=Learning)
    sources: tuple[Source, ...] = ()  # [[sources]]: archives `vesalius pull` queries (docs/pull.md)
    max_stow_mb: int = 4096  # the largest STOW-RS request body (POST /studies) accepted
    dashboard: Dashboard = field(default_factory=Dashboard)
    ray: Ray = field(default_factory=Ray)  # [ray]: hand pipeline runs to a Ray cluster (scale-out)
    # several nodes sharing one database (docs/scale-out.md): each claim (a job, a delivery, an open
    # association) carries this name and is renewed every lease_seconds/3; one not renewed for
    # lease_seconds belongs to a dead node and is taken over by another
    node_name: str = ""  # "" = the host name; nodes sharing a database need different names
    lease_seconds: float = 30.0
    database: Database = field(default_factory=Database)

    def __post_init__(self) -> None:
        check_types(self)
        ae_title("ae_title", self.ae_title)
        if self.node_name and not NODE_NAME.fullmatch(self.node_name):
            raise FieldError(f"node_name: 1-64 letters, digits, '.', '_' or '-', got {self.node_name!r}")
        for name in ("port", "tls_port", "http_port"):
            port(name, getattr(self, name))
        for i, allowed in enumerate(self.allowed_calling_aes):
            _allowed_ae(f"allowed_calling_aes[{i}]", allowed)
        for name in ("max_associations", "max_associations_per_peer", "max_instance_mb", "idle_timeout",
                     "quiet_period", "stability_timeout", "study_quiet_period", "workers", "job_attempts",
                     "gpu_jobs_per_device", "lease_seconds"):
            positive(name, getattr(self, name))
        if not MIN_PDU <= self.max_pdu <= MAX_PDU:
            raise FieldError(f"max_pdu: must be {MIN_PDU}-{MAX_PDU} bytes (a finite maximum bounds "
                             f"the memory one peer can use), got {self.max_pdu}")
        not_negative("min_free_disk_mb", self.min_free_disk_mb)
        if self.tls_port and self.tls is None:
            raise FieldError("tls_port: the TLS listener needs a [tls] table with certificate and "
                             "private_key")
        if self.tls is not None and not self.tls_port:
            raise FieldError("tls: set tls_port to start the TLS listener")
        if self.tls_port and self.tls_port == self.port:
            raise FieldError(f"tls_port: must differ from port ({self.tls_port})")
        tokens = [t.name for t in self.http_tokens]
        if len(set(tokens)) != len(tokens) or "local" in tokens:
            raise FieldError(f"http_tokens: names must be unique and not 'local' (the generated "
                             f"token's), got {tokens}")
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise FieldError(f"destinations: names must be unique, got {names}")
        _check_references(self)
        positive("max_stow_mb", self.max_stow_mb)
        sources = [s.name for s in self.sources]
        if len(set(sources)) != len(sources):
            raise FieldError(f"sources: names must be unique, got {sources}")

    def destination_names(self, rule: Rule) -> tuple[str, ...]:
        return rule.destinations or tuple(d.name for d in self.destinations)

    @property
    def owner(self) -> str:
        """This node's name in the claims it holds: ``node_name``, or the host name."""
        return self.node_name or host_node_name()


def host_node_name() -> str:
    """The host name as a node name (what NODE_NAME allows; a container's name is its host name)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "node"


MIN_PDU, MAX_PDU = 4096, 256 * 2**20


TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
NODE_NAME = TOKEN_NAME  # also a file name prefix (the listener's files being received)


def _allowed_ae(key: str, value: str) -> None:
    """``AE`` or ``AE@IP`` or ``AE@IP/PREFIX`` (the AE title bound to a host or network)."""
    ae, at, host = value.rpartition("@")
    if not at:
        return ae_title(key, value)
    ae_title(key, ae)
    try:
        ipaddress.ip_network(host, strict=False)
    except ValueError as err:
        raise FieldError(f"{key}: expected AE or AE@IP or AE@IP/PREFIX, got {value!r} ({err})") from None


def _check_references(config: Config) -> None:
    known = {d.name for d in config.destinations}
    for i, rule in enumerate(config.rules):
        try:
            expand(rule.model, config.models)
        except FieldError as err:
            raise FieldError(f"rules[{i}].model: {err}") from None
        for name in rule.destinations:
            if name not in known:
                raise FieldError(f"rules[{i}].destinations: unknown destination {name!r} "
                                 f"(configured: {', '.join(sorted(known)) or 'none'})")


def _tables(key: str, value: Any) -> list[Any]:
    """An array of tables (``[[rules]]``), before its tables are read."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of [[{key}]] tables, got {value!r}")
    return value


def _relative(table: Any, names: tuple[str, ...], base: Path | None) -> Any:
    """The table with its path keys taken from ``base`` (strings only: others fail their check)."""
    if not isinstance(table, dict):
        return table
    return {k: str(under(base, Path(v))) if k in names and isinstance(v, str) else v
            for k, v in table.items()}


def parse_config(data: dict[str, Any], base: Path | None = None) -> Config:
    """A Config from a parsed TOML table; raises ConfigError naming the offending key.
    Relative paths (models, certificates, token files) are taken from ``base`` (the config file's folder)."""
    try:
        values = dict(data)
        if "rules" in data:
            values["rules"] = tuple(
                from_table(Rule, {"name": f"rule{i}", **t} if isinstance(t, dict) else t, f"rules[{i}]")
                for i, t in enumerate(_tables("rules", data["rules"])))
        elif "model" in data:  # the default rule runs the configured model
            model = data["model"]  # not a string: Config's own check names the key
            values["rules"] = (Rule(name="ct", model=model),) if isinstance(model, str) else ()
        if "destinations" in data:
            tables = _tables("destinations", data["destinations"])
            values["destinations"] = tuple(parse_destination(f"destinations[{i}]", t, base)
                                           for i, t in enumerate(tables))
        if "sources" in data:
            values["sources"] = tuple(parse_source(f"sources[{i}]", t, base)
                                      for i, t in enumerate(_tables("sources", data["sources"])))
        if "http_tokens" in data:
            values["http_tokens"] = tuple(
                from_table(HttpToken, _relative(t, ("token_file",), base), f"http_tokens[{i}]")
                for i, t in enumerate(_tables("http_tokens", data["http_tokens"])))
        if "models" in data:
            values["models"] = parse_model_specs(_tables("models", data["models"]), base=base)
        if "tls" in data:
            files = ("certificate", "private_key", "ca_certificates")
            values["tls"] = from_table(ListenerTLS, _relative(data["tls"], files, base), "tls")
        for key, cls in (("retry", Retry), ("retention", Retention), ("dashboard", Dashboard),
                         ("learning", Learning), ("database", Database),
                         ("ray", Ray)):
            if key in data:
                values[key] = from_table(cls, data[key], key)
        return from_table(Config, values)
    except ConfigError:
        raise
    except FieldError as err:
        raise ConfigError(str(err)) from None


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
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    extra = tuple(DicomDestination.parse(d) for d in flags.get("destinations") or ())
    if extra:
        values["destinations"] = config.destinations + extra
    if "model" in values:  # --model applies to every rule
        values["rules"] = tuple(replace(r, model=values["model"]) for r in config.rules)
    try:
        return replace(config, **values)
    except FieldError as err:
        flag, _, rest = str(err).partition(":")
        raise ConfigError(f"--{flag.replace('_', '-')}:{rest}") from None
