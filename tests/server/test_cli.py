"""The radixlm command line: engine flags generated 1:1 from EngineConfig, bench dispatch."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from radixlm.config import EngineConfig, option_fields
from radixlm.server import cli


def _parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_every_engine_option_has_a_flag_with_its_help():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0]
                         .choices["serve"].format_help().split())
    for f in option_fields():
        assert "--" + f.name.replace("_", "-") in help_text
        assert " ".join(f.metadata["help"].split()) in help_text


def test_only_given_options_reach_the_engine():
    args = _parse("--model", "/m", "--page-size", "16", "--no-enable-radix-cache",
                  "--schedule-policy", "fcfs", "--mem-fraction", "0.5", "--port", "1234")
    kwargs = cli.engine_kwargs(args)
    assert kwargs == {"model": "/m", "page_size": 16, "enable_radix_cache": False,
                      "schedule_policy": "fcfs", "mem_fraction": 0.5}
    config = EngineConfig.from_kwargs(**kwargs)
    assert config.cache.page_size == 16 and not config.cache.enable_radix_cache
    assert config.scheduler.schedule_policy == "fcfs" and config.model.model == "/m"
    assert args.port == 1234 and args.host == "127.0.0.1"


def test_overlap_scheduling_is_on_by_default_and_can_be_switched_off():
    assert EngineConfig().scheduler.enable_overlap
    kwargs = cli.engine_kwargs(_parse("--no-enable-overlap"))
    assert kwargs == {"enable_overlap": False}
    assert not EngineConfig.from_kwargs(**kwargs).scheduler.enable_overlap


def test_defaults_give_the_default_config():
    kwargs = cli.engine_kwargs(_parse())
    assert kwargs == {}
    assert EngineConfig.from_kwargs(**kwargs) == EngineConfig()


def test_flags_round_trip_every_field_type():
    defaults = EngineConfig().flat()
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.type.startswith("bool"):
            argv = [flag if not defaults[f.name] else "--no-" + flag[2:]]
            expected = not defaults[f.name]
        elif f.metadata.get("choices"):
            expected = f.metadata["choices"][-1]
            argv = [flag, str(expected)]
        else:
            expected = {"int": 3, "float": 0.25, "str": "x"}[cli._base_type(f)]
            argv = [flag, str(expected)]
        assert cli.engine_kwargs(_parse(*argv)) == {f.name: expected}


def test_invalid_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("--schedule-policy", "nope")
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_config_fields_cover_the_flat_config():
    assert {f.name for f in option_fields()} == set(EngineConfig().flat())
    assert all(isinstance(f, dataclasses.Field) for f in option_fields())


@pytest.fixture
def bench_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_bench_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "radix_cache.py").write_text(
        "CALLS = []\n\ndef main(argv):\n    CALLS.append(argv)\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "BENCH_PACKAGE", "fake_bench_pkg")
    yield package
    for name in [m for m in sys.modules if m.startswith("fake_bench_pkg")]:
        del sys.modules[name]


def test_bench_dispatches_to_the_module_main(bench_package):
    assert cli.bench_names() == ["radix-cache"]
    assert cli.main(["bench", "radix-cache", "--n", "5"]) == 3
    assert cli.main(["bench", "radix_cache"]) == 3
    assert sys.modules["fake_bench_pkg.radix_cache"].CALLS == [["--n", "5"], []]


def test_unknown_bench_is_a_clear_error(bench_package, capsys):
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "radix-cache" in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_server_limits_have_documented_defaults_and_flags():
    limits = cli.server_limits(_parse(), EngineConfig())
    assert limits.max_request_bytes == 4 * 1024 * 1024
    assert limits.max_sequences_per_request == 256
    assert limits.max_queued_requests == 1024  # no --max-queued-requests: the server's default
    assert limits.request_timeout is None and limits.header_timeout == 5.0
    args = _parse("--max-request-bytes", "1000", "--max-sequences-per-request", "8",
                  "--request-timeout", "2.5", "--header-timeout", "1", "--max-queued-requests",
                  "3", "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem", "--allowed-origins",
                  "http://a.example", "http://b.example", "--disable-docs")
    limits = cli.server_limits(args, EngineConfig.from_kwargs(**cli.engine_kwargs(args)))
    assert (limits.max_request_bytes, limits.max_sequences_per_request,
            limits.max_queued_requests, limits.request_timeout, limits.header_timeout) == (
        1000, 8, 3, 2.5, 1.0)
    assert (args.ssl_keyfile, args.ssl_certfile) == ("k.pem", "c.pem")
    assert args.allowed_origins == ["http://a.example", "http://b.example"]
    assert args.disable_docs and not _parse().disable_docs


def test_server_limits_refuse_nonsense():
    from radixlm.server.common import ServerLimits

    for bad in ({"max_request_bytes": 0}, {"max_sequences_per_request": 0},
                {"request_timeout": 0.0}, {"header_timeout": -1.0},
                {"max_queued_requests": -1}):
        with pytest.raises(ValueError):
            ServerLimits(**bad)
