"""The configuration schema is closed, typed and layered (defaults → file → env → overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchcast.cli import main
from shared.config import Config, describe, load_config, to_toml
from shared.errors import ConfigError


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(to_toml(Config()))
    assert load_config(path) == Config()


def test_repository_config_files_are_valid() -> None:
    for path in sorted(Path(__file__).resolve().parents[2].joinpath("config").glob("*.toml")):
        load_config(path, environ={})


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[edge]\nrate_hzz = 3\n")
    with pytest.raises(ConfigError, match=r"edge\.rate_hzz: unknown key \(did you mean 'rate_hz'\?\)"):
        load_config(path, environ={})


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[egde]\ndevices = 3\n")
    with pytest.raises(ConfigError, match="egde: unknown key"):
        load_config(path, environ={})


@pytest.mark.parametrize(("text", "message"), [
    ("[broker]\nport = 'x'\n", "broker.port: expected an integer"),
    ("[broker]\nport = true\n", "broker.port: expected an integer"),
    ("[broker]\nport = 70000\n", "broker.port must be in"),
    ("[gate]\nkind = 'renyi'\n", "gate.kind: 'renyi' is not one of"),
    ("[codec]\nquality = 0\n", "codec.quality must be in"),
    ("[edge]\ndevices = 0\n", "edge.devices must be"),
    ("[selection]\nspread = -2\n", "selection.spread must be"),
    ("[selection]\nspread = 1.5\n", "selection.spread: expected an integer"),
    ("not toml = = 1", "not valid TOML"),
])
def test_invalid_values_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_environment_overrides_file_and_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[broker]\nport = 1900\n[worker]\nprecision = 'fp32'\n")
    cfg = load_config(path, environ={"PATCHCAST_BROKER__PORT": "1901", "PATCHCAST_MODELS__PRETRAINED": "yes",
                                     "UNRELATED": "1"})
    assert cfg.broker.port == 1901
    assert cfg.models.pretrained is True
    assert cfg.worker.precision == "fp32"


def test_explicit_overrides_win_and_none_means_unset() -> None:
    cfg = load_config(environ={"PATCHCAST_EDGE__DEVICES": "3"},
                      overrides={"edge": {"devices": 5, "rate_hz": None}})
    assert cfg.edge.devices == 5
    assert cfg.edge.rate_hz == Config().edge.rate_hz


def test_yaml_files_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  threshold: 1.5\n")
    assert load_config(path, environ={}).gate.threshold == 1.5


def test_every_field_is_described() -> None:
    rows = describe()
    assert rows and all(help_text for _, _, help_text in rows)


def test_validate_config_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[gate]\nthreshold = 0.5\n")
    bad.write_text("[gate]\nthreshhold = 0.5\n")
    assert main(["--validate-config", str(good)]) == 0
    assert main(["--validate-config", str(bad)]) == 1
    assert "did you mean 'threshold'" in capsys.readouterr().err


def test_gpu_example_config_sets_the_device_and_gpu_caps() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "gpu.toml", environ={})
    assert cfg.worker.device == "cuda" and cfg.batching.attention == "auto"
    assert cfg.batching.max_batch == 1024 and cfg.batching.max_tokens == 32768
    assert cfg.worker.queue_capacity >= cfg.batching.max_batch  # a full batch must fit in the queue
    # Neither the model nor the pixel decoder shares the event loop's GIL (docs/service.md).
    assert cfg.worker.uses_engine_process and cfg.worker.decode_processes >= 1


def test_mutable_defaults_are_not_shared_between_instances() -> None:
    """A list/dict default given to a config field is copied per instance, never one shared object."""
    from dataclasses import dataclass

    from shared.config import _f

    @dataclass
    class Section:
        names: list[str] = _f(["a"], "names")  # noqa: RUF009 (the pattern under test)
        table: dict[str, int] = _f({"a": 1}, "table")  # noqa: RUF009

    first, second = Section(), Section()
    first.names.append("b")
    first.table["b"] = 2
    assert second.names == ["a"]
    assert second.table == {"a": 1}
    assert Section().names == ["a"]
