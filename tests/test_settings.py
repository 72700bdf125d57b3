"""Flags, environment variables, defaults and clear errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from exporter.cli import build_serve_parser
from exporter.settings import Settings, SettingsError, env_name, from_namespace


def parse(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return from_namespace(build_serve_parser().parse_args(argv), env or {})


def test_defaults_match_the_issue() -> None:
    s = parse([])
    assert (s.host, s.port, s.metrics_port, s.upstream) == ("0.0.0.0", 8000, 9400, "")


def test_every_field_has_a_flag_and_an_env_var() -> None:
    parser = build_serve_parser()
    help_text = parser.format_help()
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert env_name(f.name) in help_text


def test_flag_beats_env_beats_default() -> None:
    env = {"LLM_EXPORTER_PORT": "9001", "LLM_EXPORTER_UPSTREAM": "http://e:1",
           "LLM_EXPORTER_INJECT_USAGE": "false", "LLM_EXPORTER_SLO_TTFT": "0.25"}
    s = parse(["--port", "9002"], env)
    assert s.port == 9002 and s.upstream == "http://e:1"
    assert s.inject_usage is False and s.slo_ttft == 0.25
    assert parse(["--inject-usage"], env).inject_usage is True


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--port", "70000"], {}, "port"),
    (["--upstream", "127.0.0.1:8080"], {}, "http(s) URL"),
    ([], {"LLM_EXPORTER_PORT": "eighty"}, "LLM_EXPORTER_PORT"),
    ([], {"LLM_EXPORTER_CAPTURE_CONTENT": "maybe"}, "LLM_EXPORTER_CAPTURE_CONTENT"),
    (["--buckets-ttft", "0.5,0.1"], {}, "increasing"),
    (["--max-models", "0"], {}, "max-models"),
    (["--upstream-timeout", "-1"], {}, "negative"),
])
def test_bad_values_say_what_is_wrong(argv: list[str], env: dict[str, str],
                                      message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv, env)


def test_cli_help_and_errors_from_a_real_process() -> None:
    out = subprocess.run([sys.executable, "-m", "exporter", "serve", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "LLM_EXPORTER_UPSTREAM" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "exporter", "serve", "--port", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--port" in bad.stderr and "Traceback" not in bad.stderr
    top = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert top.returncode == 0
    for cmd in ("serve", "rules", "dashboards", "engine", "demo"):
        assert cmd in top.stdout
