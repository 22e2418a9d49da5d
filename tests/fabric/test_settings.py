from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.settings import ServiceSettings, flags, option, options


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


@dataclass
class Tuning:
    threads: int = option(1, "threads")
    mode: str = option("fast", "mode")

    def validate(self) -> None:
        if self.threads < 1:
            raise ValueError("tuning: threads must be positive")


@dataclass
class Service(ServiceSettings):
    service = "demo"

    cache_mb: int = option(16, "cache size")
    tuning: Tuning = options(Tuning, prefix="tuning")
    plain: Tuning = options(Tuning)


def test_a_service_reads_only_its_own_variables_and_the_shared_ones():
    env = {"RAGLOOM_CACHE_MB": "99", "RAGLOOM_DEMO_CACHE_MB": "32", "RAGLOOM_LOG_LEVEL": "DEBUG",
           "RAGLOOM_PORT": "7000", "RAGLOOM_DEMO_PORT": "7001"}
    s = Service.from_args([], environ=env)
    # its own option: only the prefixed variable; shared ones: prefixed first, then the unprefixed
    assert s.cache_mb == 32 and s.log_level == "DEBUG" and s.port == 7001
    assert Service.from_args([], environ={"RAGLOOM_CACHE_MB": "99"}).cache_mb == 16
    assert Service.from_args([], environ={"RAGLOOM_PORT": "7000"}).port == 7000


def test_option_groups_become_prefixed_flags_and_variables_and_validate():
    s = Service.from_args(["--tuning-threads", "4", "--threads", "2"], environ={"RAGLOOM_DEMO_TUNING_MODE": "slow"})
    assert s.tuning == Tuning(threads=4, mode="slow") and s.plain == Tuning(threads=2)
    assert {f.flag for f in flags(Service)} >= {"--tuning-threads", "--tuning-mode", "--threads", "--mode", "--cache-mb"}
    with pytest.raises(ValueError, match="tuning: threads must be positive"):
        Service.from_args(["--tuning-threads", "0"], environ={})
