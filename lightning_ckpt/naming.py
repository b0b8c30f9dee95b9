"""Checkpoint file names from ``filename`` templates, exactly as Lightning's ModelCheckpoint.

``"{epoch}-{val_loss:.3f}"`` becomes ``epoch=2-val_loss=0.123.ckpt``; keys may contain dots or
slashes (``{val/loss}``); a key absent from the metrics formats as 0, as in Lightning. Slashes in
the *result* would create sub-directories on some stores and not on others, so they are replaced
by underscores.

Owns: templates to names, ``-vN`` versions. Must not: look at storage (which names are taken is
:mod:`lightning_ckpt.save_names`'s question).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.layout import RESERVED_MARK, check_name

__all__ = [
    "DEFAULT_TEMPLATE",
    "EXTENSION",
    "LAST_NAME",
    "STARTING_VERSION",
    "format_checkpoint_name",
    "validate_template",
    "versioned_name",
]

DEFAULT_TEMPLATE = "{epoch}-{step}"
EXTENSION = ".ckpt"
LAST_NAME = "last"

_KEY = re.compile(r"(\{.*?)[:\}]")


def validate_template(template: str) -> None:
    """Reject templates that cannot produce a file name, at construction time."""
    if not isinstance(template, str) or not template.strip():
        raise ConfigurationError(f"filename must be a non-empty template string, got {template!r}")
    if "/" in _KEY.sub("", template):
        raise ConfigurationError(f"filename={template!r} must not contain '/': checkpoints live in dirpath")
    try:
        name = format_checkpoint_name(template, {})
    except (ValueError, IndexError, KeyError) as exc:
        raise ConfigurationError(f"filename={template!r} is not a valid template: {exc}") from exc
    if RESERVED_MARK in template:
        raise ConfigurationError(f"filename={template!r} contains {RESERVED_MARK!r}, reserved for lightning-ckpt's "
                                 "own temporary files and versions")
    check_name(name)


def format_checkpoint_name(
    template: str | None,
    metrics: Mapping[str, float],
    auto_insert_metric_name: bool = True,
    suffix: str = EXTENSION,
    join: str = "-",
    equals: str = "=",
) -> str:
    """The file name for ``metrics`` (plain floats/ints) under ``template``.

    ``join`` and ``equals`` are ModelCheckpoint's ``CHECKPOINT_JOIN_CHAR`` / ``CHECKPOINT_EQUALS_CHAR``.
    """
    filename = template or "{epoch}" + join + "{step}"
    values: dict[str, float | int] = {}
    for group in sorted(_KEY.findall(filename), key=len, reverse=True):
        name = group[1:]
        if auto_insert_metric_name:
            filename = filename.replace(group, name + equals + "{" + name)
        filename = filename.replace(group, f"{{0[{name}]")
        values[name] = metrics.get(name, 0)
    try:
        out = filename.format(values)
    except ValueError:
        # an integer spec ("{epoch:03d}") applied to an integral float
        out = filename.format({k: int(v) if float(v).is_integer() else v for k, v in values.items()})
    return out.replace("/", "_") + suffix


STARTING_VERSION = 1


def versioned_name(
    base: str, taken: Callable[[str], bool], extension: str = EXTENSION, start: int = STARTING_VERSION,
    join: str = "-",
) -> str:
    """``base + extension``, or Lightning's ``base-v1``, ``base-v2``, ... while ``taken`` says so."""
    name, version = base + extension, start
    while taken(name):
        name = f"{base}{join}v{version}{extension}"
        version += 1
    return name
