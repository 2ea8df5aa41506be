"""The node's configuration: one TOML file, validated at start-up; CLI flags override common keys."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vesalius.inference.models.registry import ModelSpec, ModelSpecError, expand, parse_model_specs

DEFAULT_AE_TITLE = "VESALIUS"
DEFAULT_PORT = 11112
DEFAULT_HTTP_PORT = 8080
DEFAULT_DATA_DIR = "./vesalius-data"
DEFAULT_MODEL = "builtin_ct"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is wrong."""


DESTINATION_KINDS = ("dicom", "dicomweb")


@dataclass(frozen=True)
class Destination:
    """A peer that receives our results: by C-STORE (kind "dicom": ae_title, host, port) or by
    DICOMweb STOW-RS (kind "dicomweb": url, the DICOMweb root such as http://pacs/dicom-web)."""

    name: str
    ae_title: str
    host: str
    port: int
    max_pdu: int = 0
    timeout: float = 30.0
    kind: str = "dicom"
    url: str = ""
    # which result objects it receives (the BINARY SEG always): see docs/outputs.md
    labelmap: bool = False  # also the Label Map SEG (skipped if the peer does not accept it)
    encapsulated_stl: bool | tuple[str, ...] = False  # True: every structure; or these names
    surfaces: bool = True
    sr: bool = True
    preview: bool = True  # the 3D preview images (Secondary Capture)
    max_attempts: int = 0  # delivery tries before "failed"; 0: [retry] max_attempts

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT`` as given on the command line."""
        match = re.fullmatch(r"([^@]{1,16})@([^:@]+):(\d{1,5})", text.strip())
        if not match:
            raise ConfigError(f"destination {text!r}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        ae, host, port = match.groups()
        return cls(name=ae, ae_title=ae, host=host, port=int(port))


@dataclass(frozen=True)
class Rule:
    """Which completed series become jobs: every given criterion must match (empty = any)."""

    name: str
    modality: tuple[str, ...] = ("CT",)
    sop_class: tuple[str, ...] = ()  # empty: any image class a model reads (CT, Enhanced CT, ...)
    series_description: str = ""  # regular expression, searched case-insensitively
    body_part: tuple[str, ...] = ()
    calling_ae: tuple[str, ...] = ()
    model: str = DEFAULT_MODEL
    destinations: tuple[str, ...] = ()  # names; empty = all destinations


@dataclass(frozen=True)
class Retry:
    """Delivery retries: exponential backoff from ``base_delay`` capped at ``max_delay``."""

    base_delay: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 12


@dataclass(frozen=True)
class Config:
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    http_port: int = DEFAULT_HTTP_PORT
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    allowed_calling_aes: tuple[str, ...] = ()  # empty: any calling AE may send
    min_free_disk_mb: int = 500  # below this free space in data_dir, instances are refused (A700)
    quiet_period: float = 1.0
    stability_timeout: float = 10.0
    workers: int = 1
    job_attempts: int = 2
    model: str = DEFAULT_MODEL
    models: dict[str, ModelSpec] = field(default_factory=dict)  # [[models]] by name (docs/models.md)
    gpu_jobs_per_device: int = 1  # jobs sharing one GPU at a time
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Rule, ...] = (Rule(name="ct"),)
    retry: Retry = field(default_factory=Retry)

    def destination_names(self, rule: Rule) -> tuple[str, ...]:
        return rule.destinations or tuple(d.name for d in self.destinations)


def _check_type(key: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and expected in (int, float, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    _check_type(key, value, list)
    return tuple(_check_type(f"{key}[{i}]", v, str) for i, v in enumerate(value))


def _known(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _ae_title(key: str, value: Any) -> str:
    _check_type(key, value, str)
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ConfigError(f"{key}: an AE title is 1-16 printable characters, got {value!r}")
    return value


def _port(key: str, value: Any) -> int:
    _check_type(key, value, int)
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key}: port must be 0-65535, got {value}")
    return value


def _positive(key: str, value: Any) -> float:
    _check_type(key, value, (int, float))
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")
    return float(value)


def _destination(i: int, table: Any) -> Destination:
    key = f"destinations[{i}]"
    _check_type(key, table, dict)
    _known(key, table, {f.name for f in fields(Destination)})
    kind = _check_type(f"{key}.kind", table.get("kind", "dicom"), str)
    if kind not in DESTINATION_KINDS:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(DESTINATION_KINDS)}, got {kind!r}")
    timeout = _positive(f"{key}.timeout", table.get("timeout", 30.0))
    outputs = _outputs(key, table)
    if kind == "dicomweb":
        for dicom_only in ("ae_title", "host", "port", "max_pdu"):
            if dicom_only in table:
                raise ConfigError(f"{key}.{dicom_only}: only for kind = \"dicom\" "
                                  "(a dicomweb destination has url)")
        for required in ("name", "url"):
            if required not in table:
                raise ConfigError(f"{key}.{required}: required for kind = \"dicomweb\"")
        url = _check_type(f"{key}.url", table["url"], str)
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
            raise ConfigError(f"{key}.url: expected the DICOMweb root as http(s)://host[:port]/path, "
                              f"got {url!r}")
        return Destination(name=_check_type(f"{key}.name", table["name"], str), ae_title="", host="", port=0,
                           timeout=timeout, kind=kind, url=url.rstrip("/"), **outputs)
    if "url" in table:
        raise ConfigError(f"{key}.url: only for kind = \"dicomweb\"")
    for required in ("ae_title", "host", "port"):
        if required not in table:
            raise ConfigError(f"{key}.{required}: required")
    ae = _ae_title(f"{key}.ae_title", table["ae_title"])
    return Destination(
        name=_check_type(f"{key}.name", table.get("name", ae), str),
        ae_title=ae,
        host=_check_type(f"{key}.host", table["host"], str),
        port=_port(f"{key}.port", table["port"]),
        max_pdu=int(_check_type(f"{key}.max_pdu", table.get("max_pdu", 0), int)),
        timeout=timeout,
        **outputs,
    )


def _outputs(key: str, table: dict[str, Any]) -> dict[str, Any]:
    """The per-destination output switches (and its own number of delivery tries)."""
    values: dict[str, Any] = {}
    if "max_attempts" in table:
        attempts = _check_type(f"{key}.max_attempts", table["max_attempts"], int)
        values["max_attempts"] = int(_positive(f"{key}.max_attempts", attempts))
    for name in ("labelmap", "surfaces", "sr", "preview"):
        if name in table:
            values[name] = _check_type(f"{key}.{name}", table[name], bool)
    if "encapsulated_stl" in table:
        value = table["encapsulated_stl"]
        values["encapsulated_stl"] = value if isinstance(value, bool) else _strings(
            f"{key}.encapsulated_stl", value)
    return values


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
    return Rule(**values)


def parse_config(data: dict[str, Any], base: Path | None = None) -> Config:
    """A Config from a parsed TOML table; raises ConfigError naming the offending key.
    Relative model paths are taken from ``base`` (the config file's folder)."""
    top = {f.name for f in fields(Config)}
    _known("", data, top)
    values: dict[str, Any] = {}
    if "ae_title" in data:
        values["ae_title"] = _ae_title("ae_title", data["ae_title"])
    if "host" in data:
        values["host"] = _check_type("host", data["host"], str)
    for key in ("port", "http_port"):
        if key in data:
            values[key] = _port(key, data[key])
    if "data_dir" in data:
        values["data_dir"] = Path(_check_type("data_dir", data["data_dir"], str))
    if "allowed_calling_aes" in data:
        aes = _strings("allowed_calling_aes", data["allowed_calling_aes"])
        values["allowed_calling_aes"] = tuple(_ae_title(f"allowed_calling_aes[{i}]", a)
                                              for i, a in enumerate(aes))
    if "min_free_disk_mb" in data:
        values["min_free_disk_mb"] = _check_type("min_free_disk_mb", data["min_free_disk_mb"], int)
        if values["min_free_disk_mb"] < 0:
            raise ConfigError(f"min_free_disk_mb: must be >= 0, got {values['min_free_disk_mb']}")
    for key in ("quiet_period", "stability_timeout"):
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
        dests = tuple(_destination(i, t) for i, t in enumerate(_check_type("destinations",
                                                                            data["destinations"], list)))
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
                retry = replace(retry, **{key: _positive(f"retry.{key}", table[key])})
        if "max_attempts" in table:
            attempts = _check_type("retry.max_attempts", table["max_attempts"], int)
            retry = replace(retry, max_attempts=int(_positive("retry.max_attempts", attempts)))
        values["retry"] = retry
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


def with_overrides(config: Config, **flags: Any) -> Config:
    """Apply command-line flags (None = not given) over the file's values."""
    values = {k: v for k, v in flags.items() if v is not None and k != "destinations"}
    if "ae_title" in values:
        _ae_title("--ae-title", values["ae_title"])
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    extra = tuple(Destination.parse(d) for d in flags.get("destinations") or ())
    if extra:
        values["destinations"] = config.destinations + extra
    updated = replace(config, **values)
    if "model" in values:  # --model applies to every rule
        updated = replace(updated, rules=tuple(replace(r, model=values["model"]) for r in updated.rules))
    return updated
