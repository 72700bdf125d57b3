"""``llm-exporter calibrate`` end to end: the real command (sidecar as a child process)
against a synthetic server that slows with load (TTFT +70 ms per other stream in flight), so
capacity is known in advance: with a 0.2 s TTFT objective, 3 concurrent clients meet it
(0.16 s) and 4 do not (0.23 s). The sweep steps over 3 (1, 2, 4, 6 clients): calibrate's
bisection finds it. Then the test's own client holds 0.8x and 1.2x the capacity calibrate
found, through a fresh sidecar: attainment holds at 0.8x and falls below the target at
1.2x."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import statistics
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from exporter import calibrate
from tests.harness import running_sidecar
from tests.upstream import upstream_process

pytestmark = pytest.mark.timeout(300)
SLOW = ("--ttft", "0.02", "--itl", "0.005", "--tokens", "8", "--ttft-per-active", "0.07")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One calibrate run: its output folder and the capacity (clients) its report names."""
    tmp = tmp_path_factory.mktemp("calibrate")
    slo = tmp / "slo.yaml"
    slo.write_text("objectives:\n"
                   "  - {slo: ttft, threshold_seconds: 0.2, target: 0.99}\n"
                   "  - {slo: goodput, target: 0.95}\n")
    out = tmp / "out"
    with upstream_process(*SLOW) as url:
        rc = calibrate.cli_main(["--upstream", url, "--slo", str(slo), "--concurrency",
                                 "1,2,4,6", "--window", "3", "--warmup", "1",
                                 "--output-tokens", "8", "--out", str(out)])
    assert rc == 0
    m = re.search(r"\*\*Capacity: (\d+) clients\*\*", (out / "report.md").read_text())
    assert m is not None, (out / "report.md").read_text()
    return out, int(m.group(1))


def test_calibrate_finds_the_capacity_and_writes_report_and_values(
        calibrated: tuple[Path, int]) -> None:
    out, clients = calibrated
    assert clients == 3
    report = (out / "report.md").read_text()
    assert re.search(r"^\| 3 ◀ \|", report, re.M), report  # the bisection step, in load order
    assert calibrate.CLOSED_LOOP in report
    for png in ("latency.png", "throughput.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert "calibrate with --rate for the autoscaler's figure" in (out / "values.yaml").read_text()
    values = yaml.safe_load((out / "values.yaml").read_text())
    assert values["autoscaling"] == {"metric": "capacity", "target": 0.8}
    rps = values["sidecar"]["capacity"]["requestsPerSecond"]
    # 3 clients, each request ~0.02 + 0.14 (two others) + 7 x 0.005 s: ~15 requests/s
    assert 10 < rps < 30
    assert values["sidecar"]["saturation"]["queueThreshold"] >= 1


def test_capacity_is_the_last_step_before_attainment_falls() -> None:
    steps = [_step(1, 10, 0), _step(2, 19, 1), _step(4, 8, 2), _step(8, 10, 0)]
    cap = calibrate.capacity(steps, 0.95)
    assert cap is steps[1]  # 95% at 2; 80% at 4; the recovery at 8 is not capacity
    assert calibrate.capacity(steps[::-1], 0.95) is steps[1]  # load order, not run order
    assert calibrate.capacity(steps[2:], 0.95) is None
    assert math.isnan(calibrate.Step("rate", 1, 1).attainment)


def _step(load: float, good: float, bad: float, sent: int | None = None,
          mode: str = "concurrency") -> calibrate.Step:
    n = int(good + bad) if sent is None else sent
    s = calibrate.Step(mode, load, 1.0, [calibrate.Result(True, 0.1, 0.2)] * n)
    s.counters = {"good": good, "bad": bad}
    return s


def test_a_request_not_judged_good_counts_against_the_step() -> None:
    """Cut off at the drain (the sidecar counts it cancelled) or refused with a 429 (a 4xx,
    not judged): the live goodput leaves them out, calibrate's attainment does not."""
    assert calibrate.Step.attainment.fget(_step(1, 18, 0, sent=20)) == 0.9  # type: ignore


def test_bisection_narrows_the_gap_above_the_capacity() -> None:
    nxt = calibrate.next_load
    assert nxt([_step(1, 10, 0), _step(2, 10, 0), _step(4, 5, 5)], 0.95, "concurrency") == 3
    assert nxt([_step(2, 10, 0), _step(3, 5, 5)], 0.95, "concurrency") is None  # adjacent
    assert nxt([_step(2, 10, 0), _step(4, 10, 0)], 0.95, "concurrency") is None  # none missed
    assert nxt([_step(2, 5, 5)], 0.95, "concurrency") is None  # no capacity to start from
    rate = [_step(2, 10, 0, mode="rate"), _step(4, 10, 0, mode="rate"),
            _step(8, 1, 9, mode="rate")]
    assert nxt(rate, 0.95, "rate") == 6
    assert nxt([*rate, _step(6, 5, 5, mode="rate")], 0.95, "rate") == 5
    assert nxt([_step(7.9, 10, 0, mode="rate"), _step(8, 1, 9, mode="rate")], 0.95,
               "rate") is None  # within 5%


async def _attainment(url: str, clients: int, seconds: float) -> float:
    async with running_sidecar(url, slo_ttft=0.2, slo_tpot=0, slo_e2e=0) as sc, \
            aiohttp.ClientSession() as s:
        prompts = calibrate.synthetic(8, 8, 8, 0.0, 1)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def client(i: int) -> None:
            while loop.time() < end:
                await calibrate.request(s, sc.url, "m", prompts[i % len(prompts)])

        await asyncio.gather(*(client(i) for i in range(clients)))
        good = sc.value("llm_exporter_goodput_requests_total", {"model": "m", "result": "good"})
        bad = sc.value("llm_exporter_goodput_requests_total", {"model": "m", "result": "bad"})
        return good / (good + bad)


def test_attainment_holds_below_capacity_and_falls_above_it(
        calibrated: tuple[Path, int]) -> None:
    """The test's own client, through a fresh sidecar, at 0.8x and 1.2x what calibrate
    found (whole clients: round down below, up above)."""
    _, clients = calibrated
    with upstream_process(*SLOW) as url:
        below = asyncio.run(_attainment(url, math.floor(0.8 * clients), 3))
        above = asyncio.run(_attainment(url, math.ceil(1.2 * clients), 3))
    assert below >= 0.95
    assert above < 0.95


def test_bad_prompt_files_are_refused_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: needs"):
        calibrate.from_jsonl(bad, 16)
    good = tmp_path / "g.jsonl"
    good.write_text('{"prompt": "hi", "max_tokens": 4}\n'
                    '{"messages": [{"role": "user", "content": "x"}]}\n')
    assert [p.max_tokens for p in calibrate.from_jsonl(good, 16)] == [4, 16]


@pytest.mark.parametrize("busy, late", [(0.001, False), (0.008, True)])
async def test_open_loop_arrivals_keep_their_schedule_and_say_when_they_fell_behind(
        monkeypatch: pytest.MonkeyPatch, busy: float, late: bool) -> None:
    """Open loop: exactly rate x window arrivals, kept to absolute times. A client that holds
    its loop 1 ms per arrival (the mean gap is 5 ms) keeps up; at 8 ms per arrival it cannot,
    still sends every arrival (late ones at once, the schedule not slipped) and the step says
    it fell behind."""
    sent: list[float] = []

    async def fake_request(*args: object) -> calibrate.Result:
        sent.append(asyncio.get_running_loop().time())
        time.sleep(busy)  # a busy client: each arrival holds the loop
        await asyncio.sleep(0.05)  # each request takes 50 ms
        return calibrate.Result(True, 0.01, 0.05, [], 1)

    monkeypatch.setattr(calibrate, "request", fake_request)
    monkeypatch.setattr(calibrate, "scrape", lambda url: {})
    step = await calibrate.run_step(None, "http://x", "http://x/metrics", "m", "rate", 200.0,
                                    2.0, calibrate.synthetic(4, 4, 4, 0, 1), 3)
    assert len(sent) == len(step.results) == 400
    assert step.behind is late
    assert not calibrate.Step("concurrency", 20, 10.0, [calibrate.Result(True)]).behind


async def test_a_step_reads_the_gpu_figures_the_sidecar_exports() -> None:
    """No GPU here: NVML's fake (plain data behind the collector's narrow interface) on two
    H100s through the sidecar's real /metrics. GPU memory adds up over the devices, utilisation
    and SM activity are their mean (not their sum), energy per token is the energy counter's
    rise over the step's output tokens."""
    from exporter.collectors import register_collectors
    from exporter.collectors.nvml import GPM_SM_ACTIVE, GpuProcess
    from exporter.collectors.nvml_fake import FakeGpu, FakeNvml
    from tests.harness import running_sidecar as sidecar_in_process
    from tests.upstream import Script, SyntheticUpstream

    gib = 2**30
    gpus = [FakeGpu(uuid=f"GPU-{i}", utilization=(u, 10.0), gpm={GPM_SM_ACTIVE: sm},
                    processes=[GpuProcess(4242, mem * gib)], energy_mj=1e6)
            for i, (u, sm, mem) in enumerate(((80.0, 40.0, 3), (60.0, 20.0, 5)))]
    async with SyntheticUpstream(Script(ttft=0.002, itl=0.001, tokens=4)) as up, \
            sidecar_in_process(up.url, slo_ttft=0.5) as sc, aiohttp.ClientSession() as s:
        register_collectors(sc.registry, sc.sidecar.settings, sc.sidecar.state,
                            nvml=FakeNvml(gpus))
        await asyncio.to_thread(sc.scrape)  # GPM figures need a previous sample

        async def burn() -> None:  # 3 J on each device while the step runs
            await asyncio.sleep(0.5)
            for g in gpus:
                g.energy_mj = (g.energy_mj or 0) + 3000

        burner = asyncio.create_task(burn())
        step = await calibrate.run_step(s, sc.url, sc.metrics_url, "m", "concurrency", 1, 2.5,
                                        calibrate.synthetic(4, 4, 4, 0, 1), 1)
        await burner
    tokens = step.counters["output_tokens"]
    assert tokens == sum(r.output_tokens for r in step.ok()) > 0
    assert step.peak("gpu_memory") == 8 * gib
    assert step.mean("gpu_util") == pytest.approx(0.70)
    assert step.mean("sm_active") == pytest.approx(0.30)
    assert step.joules_per_token == pytest.approx(6.0 / tokens)


@pytest.mark.parametrize("argv, message", [
    (["--window", "0"], "--window must be positive"),
    (["--refine", "-1"], "--refine not negative"),
    (["--rate", "1,x"], "--rate: expected numbers"),
    (["--rate", "1", "--concurrency", "2"], "not both"),
    (["--concurrency", "1.5"], "whole numbers"),
])
def test_bad_arguments_are_refused_before_anything_starts(
        argv: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=message):
        calibrate.cli_main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_steps_share_their_random_numbers_so_they_differ_by_load_alone() -> None:
    """Common random numbers: the step at twice the rate sends every arrival of the slower one
    (same offset, same prompt) and as many again, so it meets the same bursts and more; a
    Poisson process conditioned on its count, so it sends exactly the rate offered."""
    prompts = calibrate.synthetic(64, 4, 4, 0.5, 1)
    def draw(rate: float, seed: int = 7) -> list[tuple[float, int]]:
        return [(t, prompts.index(p)) for t, p in calibrate.arrivals(rate, 10.0, prompts, seed)]

    slow, fast = draw(20.0), draw(40.0)
    assert (len(slow), len(fast)) == (200, 400)
    assert set(slow) <= set(fast)
    assert [t for t, _ in slow] == sorted(t for t, _ in slow)
    assert all(0 <= t <= 10 for t, _ in fast)
    assert draw(20.0, seed=8) != slow  # another seed, other draws
    # uniform offsets given the count: the gaps are exponential, mean window / count
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(fast)]
    assert statistics.fmean(gaps) == pytest.approx(10.0 / 400, rel=0.1)
    assert statistics.pstdev(gaps) == pytest.approx(10.0 / 400, rel=0.2)


def test_a_sweep_that_never_missed_says_its_capacity_is_a_lower_bound(tmp_path: Path) -> None:
    passed = [_step(1, 10, 0, mode="rate"), _step(2, 20, 0, mode="rate")]
    cap = calibrate.capacity(passed, 0.95)
    assert cap is passed[1] and not calibrate.knee_found(passed, cap)
    text = calibrate.report(passed, cap, 0.95, tmp_path, {}, 0.0, plots=False)
    assert "**Capacity: at least 2 requests/s offered**" in text
    missed = [*passed, _step(3, 5, 5, mode="rate")]
    assert calibrate.knee_found(missed, cap)
    text = calibrate.report(missed, cap, 0.95, tmp_path, {}, 0.0, plots=False)
    assert "**Capacity: 2 requests/s offered**" in text
    assert calibrate.CLOSED_LOOP not in text  # open loop: the rate is the autoscaler's


def test_a_closed_loop_capacity_says_to_calibrate_by_rate(tmp_path: Path) -> None:
    steps = [_step(1, 10, 0), _step(2, 10, 0), _step(4, 5, 5)]
    cap = calibrate.capacity(steps, 0.95)
    text = calibrate.report(steps, cap, 0.95, tmp_path, {}, 0.0, plots=False)
    assert "**Capacity: 2 clients**" in text and calibrate.CLOSED_LOOP in text
