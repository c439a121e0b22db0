"""The ports browsers refuse are never granted; nor are the operator's ``exclude``."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from portlease.broker import badports, config, kernel
from portlease.broker.allocator import Allocator
from portlease.client.protocol.errors import ConfigError


def test_the_table_is_the_standards() -> None:
    # The Fetch standard's table has 83 rows; spot-check the ones CI suites meet.
    assert len(badports.BAD_PORTS) == 83
    assert badports.BAD_PORTS[10080] == "amanda"
    assert badports.BAD_PORTS[6000] == "x11"
    assert badports.BAD_PORTS[6566] == "sane-port"
    assert {6665, 6666, 6667, 6668, 6669, 6679, 6697} <= badports.BAD_PORTS.keys()
    assert {4190, 5060, 5061, 2049, 22, 25, 0} <= badports.BAD_PORTS.keys()
    assert 8080 not in badports.BAD_PORTS and 3000 not in badports.BAD_PORTS


def test_runs_are_merged_and_cut_to_the_range() -> None:
    assert badports.bad_port_runs(6600, 7000) == [(6665, 5), (6679, 1), (6697, 1)]
    assert badports.bad_port_runs(6667, 6668) == [(6667, 2)]
    assert badports.bad_port_runs(10081, 32000) == []
    assert badports.bad_port_runs(0, 2) == [(1, 1)]  # port 0 is in the table, never in a run
    assert sum(c for _, c in badports.bad_port_runs(1, 65535)) == 82


def drain(alloc: Allocator) -> list[int]:
    """Grant single ports until the allocator has none left; every port it gives."""
    got = []
    while (port := alloc.allocate(1, lambda _port: True, 0.0)) is not None:
        got.append(port)
    return got


def test_the_default_exclusion_keeps_10080_from_the_allocator() -> None:
    runs, _ = kernel.excluded_runs(10070, 10090)
    granted = drain(Allocator(10070, 10090, runs))
    assert 10080 not in granted
    assert sorted(granted) == [p for p in range(10070, 10091) if p != 10080]
    # and without the exclusion the same allocator hands it out: the test above can fail
    assert 10080 in drain(Allocator(10070, 10090, kernel.excluded_runs(10070, 10090, bad_ports=False)[0]))


def test_the_config_key_reaches_the_allocator(tmp_path: Path) -> None:
    path = tmp_path / "portlease.toml"
    path.write_text('port_min = 6660\nport_max = 6700\nexclude = [6660, "6690-6695"]\n')
    cfg = config.load_file(str(path))
    runs, _ = kernel.excluded_runs(cfg.port_min, cfg.port_max, extra=cfg.exclude)
    granted = set(drain(Allocator(cfg.port_min, cfg.port_max, runs)))
    never = {6660, *range(6690, 6696), *range(6665, 6670), 6679, 6697}
    assert granted == set(range(6660, 6701)) - never


@pytest.mark.parametrize("value", ['["9000-8000"]', "[0]", '["http"]', "8080", "[1.5]", '["80,81"]'])
def test_a_bad_exclude_entry_is_a_config_error(tmp_path: Path, value: str) -> None:
    path = tmp_path / "portlease.toml"
    path.write_text(f"exclude = {value}\n")
    with pytest.raises(ConfigError, match="exclude"):
        config.load_file(str(path))


def test_metrics_textfile_key_is_read(tmp_path: Path) -> None:
    path = tmp_path / "portlease.toml"
    path.write_text('metrics_textfile = "/var/lib/node_exporter/textfile/portlease.prom"\n')
    assert config.load_file(str(path)).metrics_textfile == "/var/lib/node_exporter/textfile/portlease.prom"
    assert config.Config().metrics_textfile is None and config.Config().exclude == []


# ---------------------------------------------------------------- a real broker


def test_a_real_broker_never_grants_10080_nor_the_operators_ports_and_reloads_them(
        tmp_path: Path) -> None:
    import signal

    from brokerproc import BrokerProc, Raw

    conf = tmp_path / "portlease.toml"
    conf.write_text("port_min = 10079\nport_max = 10082\nexclude = [10082]\n")
    broker = BrokerProc(tmp_path / "b", ["--config", str(conf)], range="10079-10082")
    broker.dir.mkdir()
    # --range on the command line would stay in force over the file; leave it to the file.
    broker.command = lambda: [  # type: ignore[method-assign]
        sys.executable, "-m", "portlease", "serve", "--socket", broker.socket,
        "--state", broker.state, "--config", str(conf)]
    broker.start()
    try:
        raw = Raw(broker.socket)
        got = [raw.call({"op": "lease", "count": 1}) for _ in range(3)]
        assert [g.get("ports") for g in got[:2]] == [[10079], [10081]]
        assert got[2]["code"] == "exhausted"
        conf.write_text("port_min = 10079\nport_max = 10082\nexclude = []\n")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        for _ in range(500):  # until the reload has happened
            reply = raw.call({"op": "lease", "count": 1})
            if reply.get("ports"):
                break
            threading.Event().wait(0.01)
        assert reply["ports"] == [10082]  # the operator's port, now allowed; 10080 still never
        assert raw.call({"op": "lease", "count": 1})["code"] == "exhausted"
        raw.close()
    finally:
        broker.stop()
