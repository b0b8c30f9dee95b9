"""File names from templates behave like Lightning's ModelCheckpoint."""

import pytest

from lightning_ckpt.errors import ConfigurationError
from lightning_ckpt.naming import format_checkpoint_name, validate_template, versioned_name


@pytest.mark.parametrize(
    ("template", "metrics", "expected"),
    [
        (None, {"epoch": 0, "step": 100}, "epoch=0-step=100.ckpt"),
        ("{epoch}-{val_loss:.3f}", {"epoch": 2, "val_loss": 0.123456}, "epoch=2-val_loss=0.123.ckpt"),
        ("{epoch:03d}", {"epoch": 5}, "epoch=005.ckpt"),
        ("{epoch:03d}", {"epoch": 5.0}, "epoch=005.ckpt"),
        ("{missing:d}", {}, "missing=0.ckpt"),
        ("{step}", {"step": 7}, "step=7.ckpt"),
        ("{val/loss:.2f}", {"val/loss": 0.5}, "val_loss=0.50.ckpt"),
        ("{epoch}-{epoch_test}", {"epoch": 1, "epoch_test": 2}, "epoch=1-epoch_test=2.ckpt"),
        ("best", {}, "best.ckpt"),
    ],
)
def test_format(template: str | None, metrics: dict, expected: str) -> None:
    assert format_checkpoint_name(template, metrics) == expected


def test_no_metric_name_insertion() -> None:
    assert format_checkpoint_name("e{epoch}", {"epoch": 3}, auto_insert_metric_name=False) == "e3.ckpt"


@pytest.mark.parametrize("bad", ["", "  ", "sub/{epoch}", "{epoch:q}", 5])
def test_bad_templates_rejected(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        validate_template(bad)  # type: ignore[arg-type]


def test_versioned_name_counts_like_lightning() -> None:
    taken = {"a.ckpt", "a-v1.ckpt"}
    assert versioned_name("a", taken.__contains__) == "a-v2.ckpt"
    assert versioned_name("b", taken.__contains__) == "b.ckpt"
    assert versioned_name("a", taken.__contains__, start=9) == "a-v9.ckpt"
