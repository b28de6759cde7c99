"""
The benchmark instrument works: C{python -m bench --quick} runs every server
it can and prints a table with numbers, and the pieces it is made of say what
they should.  No speed threshold is asserted here (the figures are printed,
never tested).

C{--quick} never installs anything: the nginx + nchan baseline runs in it
only where Debian's C{nginx} and C{libnginx-mod-nchan} are already installed
(C{python -m bench} installs them with apt-get); elsewhere the output says
that its lines are missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import Bench, Check, Metric, Sizes, Step, _ge, _le
from bench.loadgen import event_body
from bench.servers import Baseline, Nchan, NchanNoDelay, Ours, nchan_missing, set_nodelay
from bench.wire import WSConn

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = re.compile(r"^[\d,.]+( / [\d,.]+)*$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_quick_bench_prints_a_table_with_numbers() -> None:
    """`python -m bench --quick` exits 0 and prints figures for every server in every scenario it takes part in."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| measure"))
    columns = _cells(lines[head])
    servers = [c for c in columns if c.endswith("(runs)")]
    with_nchan = nchan_missing() is None
    nchans = ["nginx+nchan (runs)", "nchan, NODELAY (runs)"] if with_nchan else []
    assert servers == ["Autobahn base (runs)", *nchans, "twisted_rt (runs)"]
    if not with_nchan:
        assert "the nginx + nchan lines are missing" in out, out
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        rows[cells[0]] = dict(zip(columns, cells, strict=True))
    # the realistic fan-out first, then the batched one, ingest of both kinds, resume, idle
    labels = list(rows)
    assert labels[0].startswith("fan-out 20, 1 event/req: deliveries/s at saturation"), labels
    for prefix in ("fan-out 20, batched:", "ingest webhook", "ingest /api/publish", "resume:", "idle:"):
        assert any(label.startswith(prefix) for label in labels), (prefix, labels)
    # two rounds of numbers for each server in each row it takes part in
    for label, row in rows.items():
        if row["unit"] in ("", "% core") or "ack p50 / p99" in label:
            continue  # text rows
        for col in servers:
            if col == "nginx+nchan (runs)" and not label.startswith(("fan-out 20, 1 event/req", "idle:")):
                assert row[col] == "-", (label, row)
                continue
            if col == "nchan, NODELAY (runs)" and not label.startswith("fan-out 20, 1 event/req"):
                assert row[col] == "-", (label, row)
                continue
            assert NUMBERS.match(row[col]) and row[col].count(" / ") == 1, (label, col, row)
    # ratios to each baseline in the same run
    sat = rows["fan-out 20, 1 event/req: deliveries/s at saturation"]
    assert re.match(r"^\d+\.\d\dx$", sat["ours/base"]), sat
    if with_nchan:
        assert re.match(r"^\d+\.\d\dx$", sat["ours/nchan"]), sat
        assert re.match(r"^\d+\.\d\dx$", sat["ours/nchan ND"]), sat
    # the per-step lines, for every server and both rounds
    assert "fan-out 20, 1 event/req -- ONE event per POST /api/publish" in out
    assert "fan-out 20, batched -- up to 100 events per request" in out
    step_rows = [_cells(line) for line in lines if re.match(r"^\| [\d,]+( \*)? +\| \w+ +\| \d ", line)]
    names = {"baseline", "twisted_rt"} | ({"nchan", "nchan_nodelay"} if with_nchan else set())
    assert {r[1] for r in step_rows} == names, step_rows
    number = re.compile(r"^[\d,.]+$")
    for r in step_rows:  # latency, CPU/delivery may be n/a in a step with no delivery in its window; nothing else
        assert all(number.match(c) or (i in (4, 5, 6, 7, 8, 9) and c == "n/a") for i, c in enumerate(r) if i >= 3), r
    for name in names:
        assert any(all(number.match(c) for c in r[3:]) for r in step_rows if r[1] == name), (name, step_rows)


def test_nchan_config_listens_on_loopback_with_a_pub_and_a_websocket_sub_location(tmp_path: Path) -> None:
    """bench/nchan.conf, filled in: 127.0.0.1 only, in the foreground, our directory, the two nchan locations."""
    server = Nchan()
    try:
        server.port = 54321
        if nchan_missing() is not None:
            pytest.skip(f"no nchan here: {nchan_missing()}")
        conf = server.config()
    finally:
        server.cleanup()
    assert "listen 127.0.0.1:54321" in conf
    assert re.search(r"^daemon off;", conf, re.M) and re.search(r"^worker_processes 1;", conf, re.M)
    assert "@" not in conf.replace("$arg_channel", "")
    assert str(server.workdir) in conf  # pid, temp paths: nothing under /var
    pub = conf[conf.index("location = /api/publish"):]
    assert "nchan_publisher http;" in pub[: pub.index("}")]
    sub = conf[conf.index("location = /ws"):]
    assert "nchan_subscriber websocket;" in sub[: sub.index("}")]
    assert "nchan_subscriber_first_message newest;" in sub[: sub.index("}")]


def test_the_servers_are_driven_each_their_own_way() -> None:
    """twisted_rt and the baseline take a subscribe message; nchan a channel in the URL and the frame as the body."""
    for cls in (Ours, Baseline, Nchan):
        s = cls()
        try:
            if cls is Nchan:
                assert not s.ws_subscribe and s.publish_form == "frame"
                assert s.ws_target("bench.a") == "/ws?channel=bench.a"
                assert s.publish_target("bench.a") == "/api/publish?channel=bench.a"
                assert s.scenarios == {"fanout", "idle"}
            else:
                assert s.ws_subscribe and s.publish_form == "api"
                assert s.ws_target("bench.a") == "/ws" and s.publish_target("bench.a") == "/api/publish"
        finally:
            s.cleanup()
    # the single-event ingest line hits the bare POST resource of the baseline, our /api/publish
    assert Baseline.ingest_publish_path == "/hooks/publish" and Ours.ingest_publish_path == "/api/publish"


def test_the_frame_nchan_relays_is_the_one_twisted_rt_would_deliver() -> None:
    """Same keys in the same order, the publisher's ts in data; the subscriber counts it as an event."""
    frame = event_body("frame", "bench.x", 1234.5, 7, "xx")
    obj = json.loads(frame)
    assert list(obj) == ["op", "id", "channel", "offset", "time", "source", "type", "data"]
    assert obj["op"] == "event" and obj["data"] == {"ts": 1234.5, "seq": 7, "pad": "xx"}
    api = json.loads(event_body("api", "bench.x", 1234.5, 7, "xx"))
    assert api == {"channel": "bench.x", "data": {"ts": 1234.5, "seq": 7, "pad": "xx"}}
    c = WSConn("127.0.0.1", 1, "/ws", sample=True)
    try:
        c.state = "open"
        c.buf += bytes([0x81, 126]) + len(frame).to_bytes(2, "big") + frame
        c._parse()
        assert c.events == 1 and len(c.latencies) == 1
    finally:
        c.close()


def _bench_with(values: dict[str, list[float | None]], check: Check | None = None) -> Bench:
    b = Bench(Sizes(), rounds=2, only={"fanout"}, pin=False, verbose=False)
    b.servers = [Baseline, Nchan, Ours]
    b.metrics["x"] = Metric("x", "a figure", "ms", "{:.1f}", "≤ nchan", check, values=values)
    return b


def test_the_table_divides_ours_by_each_baseline_and_says_whether_the_target_was_met() -> None:
    b = _bench_with({"baseline": [10.0, 30.0], "nchan": [4.0, 6.0], "twisted_rt": [4.0, 5.0]}, _le("nchan"))
    row = _cells(b.table().splitlines()[2])
    assert row == ["a figure", "ms", "10.0 / 30.0", "4.0 / 6.0", "4.0 / 5.0", "0.23x", "0.90x", "≤ nchan", "yes"]
    b = _bench_with({"baseline": [1.0, 1.0], "twisted_rt": [2.0, 2.0]}, _ge("nchan"))
    row = _cells(b.table().splitlines()[2])
    assert row[3] == "-" and row[6] == "-" and row[-1] == "n/a"  # nchan took no part: no ratio, no verdict


def test_the_step_table_has_one_line_per_server_run_and_rate() -> None:
    b = _bench_with({})
    for server in ("twisted_rt", "nchan"):
        for offered, kind in ((10000.0, "step"), (40000.0, "step"), (32000.0, "80%")):
            b.steps.append(Step("single", 1000, server, 1, kind, offered, offered, offered / 1000, 5.0, 20.0, 30.0,
                                9.5, 2.0, 8.0, 0.4, 0.2, 0.0, {}, {}))
    text = b.step_tables()
    lines = [line for line in text.splitlines() if re.match(r"^\| [\d,]+", line)]
    assert [(_cells(line)[0], _cells(line)[1]) for line in lines] == [
        ("10,000", "nchan"), ("10,000", "twisted_rt"), ("40,000", "nchan"), ("40,000", "twisted_rt"),
        ("32,000 *", "nchan"), ("32,000 *", "twisted_rt"),
    ]


def test_set_nodelay_turns_on_tcp_nodelay_of_a_process_connected_sockets_from_outside() -> None:
    """set_nodelay (for the 'nchan, NODELAY' line) sets TCP_NODELAY on another process's connected TCP sockets only."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys\n"
         "lsn = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(lsn.getsockname())\n"
         "s, _ = lsn.accept()\n"
         "for x in (c, s): x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)\n"
         "print('ready', flush=True); sys.stdin.readline()\n"
         "print(*[x.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for x in (c, s, lsn)], flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        assert set_nodelay(child.pid) == 2  # the two ends of the connection, not the listener
        child.stdin.write("\n")
        child.stdin.flush()
        values = [int(v) for v in child.stdout.readline().split()]
        assert values[0] and values[1] and not values[2], values
    finally:
        child.kill()
        child.wait()
    assert NchanNoDelay.scenarios == {"fanout"} and NchanNoDelay.name == "nchan_nodelay"
    assert issubclass(NchanNoDelay, Nchan)


def test_each_round_runs_every_server_through_one_group_of_scenarios_before_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round runs the fan-outs on every server, then ingest on every server, then resume and idle: a group's figures of all servers are minutes apart at most."""
    from bench import __main__ as bench_main

    bench = Bench(Sizes(), rounds=2, only=set(bench_main.SCENARIOS), pin=False, verbose=False)
    bench.servers = [Baseline, Nchan, Ours]
    visits: list[tuple[int, str, list[str]]] = []

    def visit(self: Bench, server: object, rnd: int, todo: set[str]) -> None:
        visits.append((rnd, type(server).__name__, [s for s in bench_main.SCENARIOS if s in todo]))

    monkeypatch.setattr(Bench, "run_server", visit)
    monkeypatch.setattr(Bench, "say", lambda self, text: None)
    bench.run()
    one_round = [
        ("Baseline", ["fanout", "batched"]), ("Nchan", ["fanout"]), ("Ours", ["fanout", "batched"]),
        ("Baseline", ["ingest"]), ("Ours", ["ingest"]),
        ("Baseline", ["resume", "idle"]), ("Nchan", ["idle"]), ("Ours", ["resume", "idle"]),
    ]
    assert visits == [(r, name, todo) for r in (1, 2) for name, todo in one_round]
    assert sorted(s for group in bench_main.PASSES for s in group) == sorted(bench_main.SCENARIOS)
