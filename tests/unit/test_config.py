"""Unit tests for syncbit.config: precedence file -> SYNCBIT_* env -> overrides, validation."""

from __future__ import annotations

import pytest
import yaml

from syncbit.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SOCKET,
    AgentConfig,
    DatasetSpec,
    load_agent_config,
    socket_path_for_cli,
)
from syncbit.errors import ConfigError


@pytest.fixture
def write_config(tmp_path):
    def write(data, name="agent.yaml"):
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return p

    return write


def test_defaults_without_file_env_or_overrides():
    cfg = load_agent_config(env={})
    assert cfg == AgentConfig(node_name=cfg.node_name)
    assert cfg.block_size == DEFAULT_BLOCK_SIZE
    assert cfg.cache_quota == 0.8
    assert cfg.socket == DEFAULT_SOCKET
    assert cfg.node_name  # the hostname


def test_precedence_file_then_env_then_overrides(write_config):
    path = write_config({"node_name": "from-file", "cache_dir": "/file/cache", "mountpoint": "/file/mnt",
                         "readahead": "1MiB"})
    env = {"SYNCBIT_NODE_NAME": "from-env", "SYNCBIT_CACHE_DIR": "/env/cache"}
    cfg = load_agent_config(path, env=env, overrides={"node_name": "from-flag", "readahead": None})
    assert cfg.node_name == "from-flag"          # flag beats env and file
    assert cfg.cache_dir == "/env/cache"         # env beats file
    assert cfg.mountpoint == "/file/mnt"         # file beats default
    assert cfg.readahead == 2**20                # a flag left unset (None) does not erase the file value
    assert cfg.cache_path.as_posix() == "/env/cache"


def test_env_defaults_to_os_environ(monkeypatch, write_config):
    monkeypatch.setenv("SYNCBIT_MOUNTPOINT", "/mnt/from-env")
    monkeypatch.setenv("SYNCBIT_BLOCK_SIZE", "8MiB")
    cfg = load_agent_config(write_config({"mountpoint": "/mnt/file"}))
    assert cfg.mountpoint == "/mnt/from-env"
    assert cfg.block_size == 8 * 2**20


def test_config_is_frozen():
    cfg = load_agent_config(env={})
    with pytest.raises(AttributeError):
        cfg.cache_dir = "/elsewhere"  # type: ignore[misc]


def test_sizes_durations_and_quotas(write_config):
    cfg = load_agent_config(write_config({
        "block_size": "4MiB", "readahead": "64MiB", "min_free_disk": "2GiB", "cache_quota": "80%",
        "fetch_deadline": "2m", "prefetch_concurrency": "6", "cache_high_watermark": "0.9",
        "cache_low_watermark": 0.5, "log_format": "json",
    }), env={})
    assert cfg.block_size == 4 * 2**20
    assert cfg.readahead == 64 * 2**20
    assert cfg.min_free_disk == 2 * 2**30
    assert cfg.cache_quota == pytest.approx(0.8) and isinstance(cfg.cache_quota, float)
    assert cfg.fetch_deadline == 120.0
    assert cfg.prefetch_concurrency == 6
    assert cfg.cache_high_watermark == 0.9 and cfg.cache_low_watermark == 0.5
    assert cfg.log_format == "json"


def test_quota_in_bytes_is_an_int_and_100_percent_is_a_fraction(write_config):
    cfg = load_agent_config(write_config({"cache_quota": "500GiB"}), env={})
    assert cfg.cache_quota == 500 * 2**30 and isinstance(cfg.cache_quota, int)
    cfg = load_agent_config(env={"SYNCBIT_CACHE_QUOTA": "100%"})
    assert cfg.cache_quota == 1.0 and isinstance(cfg.cache_quota, float)


def test_labels_from_file_and_env(write_config):
    cfg = load_agent_config(write_config({"labels": {"gpu": "h100", "rack": 7}}), env={})
    assert dict(cfg.labels) == {"gpu": "h100", "rack": "7"}
    cfg = load_agent_config(env={"SYNCBIT_LABELS": "gpu=h100,zone=a=b,"})
    assert dict(cfg.labels) == {"gpu": "h100", "zone": "a=b"}


def test_datasets_from_file_only(write_config):
    path = write_config({"datasets": [{"name": "llama", "uri": "hf://meta/llama@main"},
                                      {"name": "set", "uri": "file:///data/set", "pin": False}]})
    cfg = load_agent_config(path, env={"SYNCBIT_DATASETS": "ignored"})
    assert cfg.datasets == (DatasetSpec("llama", "hf://meta/llama@main", True),
                            DatasetSpec("set", "file:///data/set", False))


def test_empty_file_gives_defaults(write_config):
    assert load_agent_config(write_config(""), env={}).mountpoint == "/datasets"


def test_unknown_file_key_is_rejected_with_its_name(write_config):
    # A typo in a quota must not silently mean "no quota".
    path = write_config({"cache_qouta": "10GiB", "mountpoint": "/m", "zzz": 1})
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path, env={})
    msg = str(ei.value)
    assert "unknown" in msg and "cache_qouta" in msg and "zzz" in msg and str(path) in msg


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="cache_qouta"):
        load_agent_config(env={}, overrides={"cache_qouta": "1GiB"})


@pytest.mark.parametrize(
    "settings,fragment",
    [
        ({"cache_quota": "0%"}, "cache_quota"),              # a zero percentage
        ({"cache_quota": "150%"}, "cache_quota"),            # more than the disk
        ({"cache_quota": "-5%"}, "cache_quota"),             # negative percentage
        ({"cache_quota": "lots%"}, "cache_quota"),           # not a number
        ({"cache_quota": "nan%"}, "cache_quota"),            # NaN percentage
        ({"cache_quota": "big"}, "cache_quota"),             # not a size
        ({"block_size": "4 parsecs"}, "block_size"),         # unknown unit
        ({"block_size": "1KiB"}, "block_size"),              # below the 64KiB floor
        ({"block_size": "1GiB"}, "block_size"),              # above the 256MiB ceiling
        ({"fetch_deadline": "soon"}, "fetch_deadline"),      # not a duration
        ({"prefetch_concurrency": "four"}, "prefetch_concurrency"),
        ({"read_concurrency": "1.5"}, "read_concurrency"),
        ({"cache_high_watermark": "1.5"}, "cache_high_watermark"),  # above 1
        ({"cache_low_watermark": "0"}, "cache_low_watermark"),      # zero
        ({"cache_low_watermark": "nan"}, "cache_low_watermark"),    # NaN passes no range check
        ({"cache_low_watermark": "x"}, "cache_low_watermark"),
        ({"cache_low_watermark": 0.9, "cache_high_watermark": 0.8}, "watermark"),  # inverted
        ({"cache_low_watermark": 0.9, "cache_high_watermark": 0.9}, "watermark"),  # equal
        ({"log_format": "xml"}, "log_format"),
        ({"labels": ["gpu", "h100"]}, "labels"),             # a list, not a mapping
        ({"datasets": {"name": "x"}}, "datasets"),           # a mapping, not a list
        ({"datasets": [{"name": "x"}]}, "datasets"),         # entry without uri
        ({"datasets": [{"name": "x", "uri": "s3://b", "extra": 1}]}, "datasets"),  # unknown entry key
        ({"datasets": ["s3://b"]}, "datasets"),              # entry not a mapping
    ],
)
def test_bad_values_give_config_error(write_config, settings, fragment):
    with pytest.raises(ConfigError) as ei:
        load_agent_config(write_config(settings), env={})
    assert fragment in str(ei.value)


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"SYNCBIT_BLOCK_SIZE": "huge"}, "block_size"),
        ({"SYNCBIT_CACHE_QUOTA": "101%"}, "cache_quota"),
        ({"SYNCBIT_FETCH_DEADLINE": "-1s"}, "fetch_deadline"),
        ({"SYNCBIT_LOG_FORMAT": "yaml"}, "log_format"),
    ],
)
def test_bad_env_values_give_config_error(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_agent_config(env=env)


def test_bad_override_gives_config_error():
    with pytest.raises(ConfigError, match="block_size"):
        load_agent_config(env={}, overrides={"block_size": "lots"})


@pytest.mark.parametrize(
    "text",
    [
        "mountpoint: [unclosed",     # YAML syntax error
        "- a\n- b\n",                # a list at the top level
        "just a string\n",           # a scalar at the top level
    ],
)
def test_malformed_files_give_config_error(write_config, text):
    with pytest.raises(ConfigError):
        load_agent_config(write_config(text), env={})


def test_missing_file_gives_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(tmp_path / "nope.yaml", env={})
    # A directory where a file is expected.
    with pytest.raises(ConfigError):
        load_agent_config(tmp_path, env={})


def test_env_labels_without_equals_give_config_error():
    # A malformed SYNCBIT_LABELS value.
    with pytest.raises(ConfigError, match="labels"):
        load_agent_config(env={"SYNCBIT_LABELS": "gpu,zone=a"})


def test_non_string_top_level_key_gives_config_error(write_config):
    # A YAML file whose keys are integers.
    with pytest.raises(ConfigError):
        load_agent_config(write_config("1: x\nmountpoint: /m\n"), env={})


def test_non_utf8_file_gives_config_error(tmp_path):
    # A binary or latin-1 file passed as --config.
    p = tmp_path / "agent.yaml"
    p.write_bytes(b"mountpoint: /d\xe9j\xe0\n\xff\xfe")
    with pytest.raises(ConfigError):
        load_agent_config(p, env={})


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"read_concurrency": 0}, id="read-0"),
        pytest.param({"prefetch_concurrency": -1}, id="prefetch-negative"),
    ],
)
def test_concurrency_must_be_positive(write_config, settings):
    # Zero/negative concurrency would deadlock reads instead of failing at start.
    with pytest.raises(ConfigError):
        load_agent_config(write_config(settings), env={})


def test_fractional_quota_is_not_silently_zero_bytes(write_config):
    # 'cache_quota: 0.5' must not turn into a quota of zero bytes (which evicts everything).
    try:
        cfg = load_agent_config(write_config({"cache_quota": 0.5}), env={})
    except ConfigError:
        return
    assert cfg.cache_quota == 0.5


def test_socket_path_for_cli(write_config):
    assert socket_path_for_cli(None, env={}) == DEFAULT_SOCKET
    assert socket_path_for_cli(None, env={"SYNCBIT_SOCKET": "/tmp/a.sock"}) == "/tmp/a.sock"
    path = write_config({"socket": "/tmp/from-file.sock"})
    assert socket_path_for_cli(str(path), env={}) == "/tmp/from-file.sock"
    assert socket_path_for_cli(None, env={"SYNCBIT_CONFIG": str(path)}) == "/tmp/from-file.sock"
    # A config file's socket is still overridden by SYNCBIT_SOCKET (env beats file).
    assert socket_path_for_cli(str(path), env={"SYNCBIT_SOCKET": "/tmp/env.sock"}) == "/tmp/env.sock"


def test_registry_mirror_and_insecure_registries_keys(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("registry_mirror_listen: 127.0.0.1:7072\nregistry_mirror_pull_through: true\n"
                 "insecure_registries: [reg.lan:5000, other:80]\n")
    cfg = load_agent_config(f, env={})
    assert (cfg.registry_mirror_listen, cfg.registry_mirror_pull_through, cfg.insecure_registries) == (
        "127.0.0.1:7072", True, ("reg.lan:5000", "other:80"))
    env = {"SYNCBIT_REGISTRY_MIRROR_PULL_THROUGH": "no", "SYNCBIT_INSECURE_REGISTRIES": "a:1,b:2"}
    cfg = load_agent_config(f, env=env)
    assert cfg.registry_mirror_pull_through is False and cfg.insecure_registries == ("a:1", "b:2")
    for text, why in (("registry_mirror_pull_through: maybe\n", "true or false"),
                      ("registry_mirror_listen: nowhere\n", "HOST:PORT"),
                      ("insecure_registries: {a: 1}\n", "list of host:port")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_agent_config(f, env={})


@pytest.mark.parametrize("text", [
    "cache_dir:\n",             # YAML's empty value: was the relative path 'None'
    "mountpoint: null\n",
    "mountpoint: [a, b]\n",     # was the path "['a', 'b']"
    "socket: {a: 1}\n",
    "node_name: true\n",
])
def test_values_that_are_not_strings_are_refused(write_config, text):
    with pytest.raises(ConfigError, match="expected a string"):
        load_agent_config(write_config(text), env={})


def test_a_number_is_still_a_name(write_config):
    assert load_agent_config(write_config("node_name: 42\n"), env={}).node_name == "42"


@pytest.mark.parametrize("pin,expected", [("'false'", False), ("'no'", False), ("false", False), ("'yes'", True)])
def test_dataset_pin_is_parsed_as_a_boolean(write_config, pin, expected):
    # bool('false') is True: a dataset written with pin: 'false' used to be pinned.
    cfg = load_agent_config(write_config(f"datasets:\n- {{name: x, uri: 'http://h/x/', pin: {pin}}}\n"), env={})
    assert cfg.datasets[0].pin is expected


def test_dataset_pin_that_is_no_boolean_is_refused(write_config):
    with pytest.raises(ConfigError, match="pin"):
        load_agent_config(write_config("datasets:\n- {name: x, uri: 'http://h/x/', pin: sometimes}\n"), env={})


def test_log_level_is_checked(write_config):
    # It was taken as given, and `syncbit daemon` then died with a traceback.
    with pytest.raises(ConfigError, match="log_level"):
        load_agent_config(write_config("log_level: BOGUS\n"), env={})
    with pytest.raises(ConfigError, match="log_level"):
        load_agent_config(env={"SYNCBIT_LOG_LEVEL": "loud"})
    assert load_agent_config(env={"SYNCBIT_LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_a_fraction_quota_means_the_same_from_the_environment(write_config):
    # cache_quota: 0.5 in YAML is half of the filesystem; SYNCBIT_CACHE_QUOTA=0.5
    # was parsed as a size and became a quota of 0 bytes.
    assert load_agent_config(env={"SYNCBIT_CACHE_QUOTA": "0.5"}).cache_quota == 0.5
    assert load_agent_config(write_config("cache_quota: '0.25'\n"), env={}).cache_quota == 0.25
    assert load_agent_config(env={"SYNCBIT_CACHE_QUOTA": "2"}).cache_quota == 2  # more than 1: bytes


@pytest.mark.parametrize("value", ["0", "0B", "0GiB"])
def test_a_zero_quota_is_refused(value):
    with pytest.raises(ConfigError, match="more than 0"):
        load_agent_config(env={"SYNCBIT_CACHE_QUOTA": value})
