from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.settings import ServiceSettings, option


@dataclass
class Demo(ServiceSettings):
    shards: list[str] = option(["a:1"], "addresses")
    data_dir: Path = option(Path("data"), "folder")
    verbose: bool = option(False, "chatty")
    ratio: float = option(0.5, "a ratio")


def test_flag_beats_environment_beats_default():
    env = {"RAGLOOM_PORT": "7000", "RAGLOOM_RATIO": "0.25", "RAGLOOM_SHARDS": "x:1, y:2"}
    s = Demo.from_args(["--port", "8000", "--verbose"], environ=env)
    assert s.port == 8000 and s.ratio == 0.25 and s.shards == ["x:1", "y:2"] and s.verbose is True
    assert s.data_dir == Path("data") and s.host == "127.0.0.1"
    assert Demo.from_args(["--data-dir", "~/d"], environ={}).data_dir == Path("~/d").expanduser()


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="port: cannot read 'abc' as int"):
        Demo.from_args([], environ={"RAGLOOM_PORT": "abc"})
    with pytest.raises(ValueError, match="port must be"):
        Demo.from_args(["--port", "70000"], environ={})
