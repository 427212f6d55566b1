"""The overlay's configuration: one YAML file validated by pydantic.

The keys under ``features`` are generated from the registry (``patches/``): one per feature,
its settings model from ``settings.py``, ``mode`` limited to the modes it declares. Found
through ``VLLM_OVERLAP_CONFIG`` (a path); the model defaults otherwise
(``configs/default.yaml`` writes them out). ``VLLM_OVERLAP=0``, like a file saying
``enabled: false`` (``configs/off.yaml``), turns every feature off, present and future.
A bad file raises :class:`ConfigError`, one message naming the file, the key and the value.

The file is read with bounds: a regular file (a link to one is fine; a FIFO, a directory or a
device is refused before anything waits on it), at most :data:`MAX_CONFIG_BYTES`, strict UTF-8,
parsed as YAML 1.2 with bounded nesting and aliases and no duplicate keys, within
``yaml_reader.MAX_SECONDS`` (``yaml_reader``).
A set but blank ``VLLM_OVERLAP_CONFIG`` is an error, not the defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import stat
from dataclasses import dataclass
from typing import Literal

import yaml
from pydantic import ValidationError, create_model, model_validator

from vllm_overlap.config import yaml_reader
from vllm_overlap.engine.settings import (  # noqa: F401  (re-exported)
    FeatureConfig,
    GdnInProjConfig,
    Strict,
    UserSiteConfig,
)
from vllm_overlap.sites import FEATURES

ENV_CONFIG = "VLLM_OVERLAP_CONFIG"
ENV_SWITCH = "VLLM_OVERLAP"
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB


class OverlayStop(SystemExit):
    """Stops vLLM start-up with one message and exit status 1.

    A ``SystemExit``, not an ``Exception``, so that the user sees this line rather than a
    traceback through vLLM's plugin loader.
    """

    def __init__(self, message: str):
        self.message = f"vllm-overlap: {message}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ConfigError(OverlayStop):
    """A configuration that cannot be used."""


def _feature_model(feature) -> type[FeatureConfig]:
    """The feature's settings model with ``mode`` narrowed to the modes it declares."""
    return create_model(
        f"{feature.settings.__name__}_{feature.name}",
        __base__=feature.settings,
        mode=(Literal[feature.modes], "dual_stream"),
    )


# One key per declared feature, in the registry's order.
FeaturesConfig = create_model(
    "FeaturesConfig",
    __base__=Strict,
    **{name: (model, model()) for name, model in ((f.name, _feature_model(f)) for f in FEATURES.values())},
)


class OverlayConfig(Strict):
    # false: the whole overlay off, every feature there is now and every one added later
    # (what VLLM_OVERLAP=0 means); the settings under ``features`` are kept but unused.
    enabled: bool = True
    strict: bool = False
    features: FeaturesConfig = FeaturesConfig()
    # Sites the user declares (``vllm_overlap.engine.user_sites``): each is a feature of its own,
    # named ``user_<id>``, with its switch and token range in the entry.
    sites: list[UserSiteConfig] = []

    @model_validator(mode="after")
    def _unique_site_ids(self):
        ids = [s.id for s in self.sites]
        for i, site_id in enumerate(ids):
            if site_id in ids[:i]:
                raise ValueError(f"sites.{i}.id = {site_id!r}: another site has this id")
        return self

    def feature(self, name: str) -> FeatureConfig:
        """The settings a feature runs with (switched off when the whole overlay is): a
        declared feature's, or a user site's (``user_<id>``)."""
        cfg = getattr(self.features, name, None)
        if cfg is None:
            cfg = next((s for s in self.sites if s.feature_name == name), None)
            if cfg is None:
                raise KeyError(f"no feature {name!r}")
        return cfg if self.enabled else cfg.model_copy(update={"enabled": False})

    def fingerprint(self) -> str:
        """A short stable hash of the active settings (for compile-cache keys)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


FEATURE_NAMES: tuple[str, ...] = tuple(FeaturesConfig.model_fields)


@dataclass(frozen=True)
class LoadedConfig:
    config: OverlayConfig
    source: str  # "built-in defaults", "VLLM_OVERLAP=0", or the file path


def _all_off() -> OverlayConfig:
    return OverlayConfig(enabled=False)


def _format_key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 60
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 3, 6, 6

# What YAML 1.1 (PyYAML's safe_load) would have read as a boolean or an integer; this file is
# read as YAML 1.2, where they are strings.
_YAML11_BOOL = {"yes", "no", "on", "off", "y", "n"}
_YAML11_INT = re.compile(r"[-+]?(?:0b[01_]+|[0-9][0-9_]*(?::[0-5]?[0-9])*)\Z")


def _hint(err: dict) -> str:
    value = err.get("input")
    if not isinstance(value, str):
        return ""
    if err["type"] == "bool_type" and value.lower() in _YAML11_BOOL:
        return " (the file is read as YAML 1.2, where only true or false are booleans)"
    if err["type"] == "int_type" and _YAML11_INT.match(value):
        return " (the file is read as YAML 1.2: no base 60, binary or _ in integers)"
    return ""


def _describe(errors: list[dict]) -> str:
    lines = []
    for err in errors:
        key = _format_key(tuple(err["loc"]))
        value = _repr.repr(err.get("input"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r} (value {value})")
        elif err["type"] == "value_error":
            lines.append(f"{key}: {msg.removeprefix('Value error, ')}")
        else:
            lines.append(f"{key} = {value}: {msg}{_hint(err)}")
        if len(lines) == 3 and len(errors) > 3:
            lines.append(f"and {len(errors) - 3} more")
            break
    return "; ".join(lines)


def parse_config(text: str, source: str) -> OverlayConfig:
    """Validate YAML text (read as YAML 1.2, ``yaml_reader``); ``source`` names it in errors."""
    try:
        data = yaml_reader.load(text)
    except yaml_reader.Refused as exc:
        raise ConfigError(f"config {source}: {exc.where}: {exc.problem}") from None
    except yaml_reader.TooSlow as exc:
        raise ConfigError(f"config {source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config {source}: YAML syntax error{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {source}: top level must be a mapping, got {type(data).__name__} {_repr.repr(data)}"
        )
    try:
        return OverlayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {source}: {_describe(exc.errors())}") from None


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: str, mode: int) -> ConfigError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return ConfigError(f"config {path}: not a regular file ({kind})")


def _too_large(path: str) -> ConfigError:
    return ConfigError(f"config {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")


def _read_bounded(path: str) -> bytes:
    """The bytes of the regular file at ``path`` (links followed), at most MAX_CONFIG_BYTES.

    Anything else is refused before it is opened for reading (a FIFO would wait for a writer,
    a device might never end), and again after opening, non-blocking, in case it changed."""

    def unreadable(exc: OSError) -> ConfigError:
        return ConfigError(f"config {path} (from {ENV_CONFIG}): cannot read it: {exc.strerror or exc}")

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | os.O_CLOEXEC)
    except OSError as exc:
        raise unreadable(exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode)
        if info.st_size > MAX_CONFIG_BYTES:
            raise _too_large(path)
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 16, MAX_CONFIG_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise _too_large(path)
        return b"".join(chunks)
    except OSError as exc:
        raise unreadable(exc) from None
    finally:
        os.close(fd)


def load_config_file(path: str) -> OverlayConfig:
    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config {path}: not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"
        ) from None
    return parse_config(text, path)


def load_config(environ: dict[str, str] | None = None) -> LoadedConfig:
    """The active configuration for this process, from the environment."""
    env = os.environ if environ is None else environ
    switch = env.get(ENV_SWITCH, "").strip()
    if switch not in ("", "0", "1"):
        raise ConfigError(f"{ENV_SWITCH} = {switch!r}: must be 0 (off) or 1 (on)")
    if switch == "0":
        return LoadedConfig(_all_off(), f"{ENV_SWITCH}=0")
    if ENV_CONFIG in env:
        path = env[ENV_CONFIG].strip()
        if not path:
            raise ConfigError(
                f"{ENV_CONFIG} is set but blank: name a config file, or unset it for the built-in defaults"
            )
        return LoadedConfig(load_config_file(path), path)
    return LoadedConfig(OverlayConfig(), "built-in defaults")
