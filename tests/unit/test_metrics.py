"""Metrics text checked by real parsers: prometheus_client's, and node_exporter's textfile collector."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from portlease.broker import metrics
from portlease.broker.metrics import Metrics, Snapshot, write_textfile

om_parser = pytest.importorskip("prometheus_client.openmetrics.parser")
classic_parser = pytest.importorskip("prometheus_client.parser")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

SNAP = Snapshot(
    ports_held=7, ports_free=80, ports_quarantined=2, ports_excluded=11, largest_free_run=40,
    leases={"attached": 3, "orphaned": 1}, clients=4, squatted_ports=5, range_low=10000, range_high=10099,
)


def busy() -> Metrics:
    m = Metrics()
    m.granted(3)
    m.granted(4)
    m.refused("exhausted")
    m.refused("exhausted")
    m.refused("quota")
    m.refused("busy")
    m.bind_check_failed("tcp", "ipv4")
    m.bind_check_failed("udp", "ipv6")
    m.bind_check_failed("udp", "ipv6")
    m.reclaimed()
    for op, uid in (("reclaim", 1000), ("reclaim", 1000), ("release", 1000), ("renew", 1001)):
        m.token_missed(op, uid)
    m.orphan_expired()
    m.orphan_expired()
    for seconds in (0.2, 1.0, 1.5, 45.0, 100000.0):
        m.lease_ended(seconds)
    return m


def samples(families: list[object]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in families:
        for s in fam.samples:  # type: ignore[attr-defined]
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_openmetrics_parses_and_carries_every_number() -> None:
    text = busy().render(SNAP)
    assert text.endswith("# EOF\n")
    families = list(om_parser.text_string_to_metric_families(text))
    types = {f.name: f.type for f in families}
    assert types == {
        "portlease_ports": "gauge", "portlease_largest_free_run": "gauge", "portlease_leases": "gauge",
        "portlease_clients": "gauge", "portlease_squatted_ports": "gauge", "portlease_range_low": "gauge",
        "portlease_range_high": "gauge", "portlease_grants": "counter", "portlease_ports_granted": "counter",
        "portlease_refusals": "counter", "portlease_bind_check_failures": "counter",
        "portlease_reclaims": "counter", "portlease_orphan_expiries": "counter",
        "portlease_token_misses": "counter",
        "portlease_lease_duration_seconds": "histogram",
    }
    assert {f.name: f.unit for f in families}["portlease_lease_duration_seconds"] == "seconds"
    assert all(f.documentation for f in families)
    v = samples(families)
    assert [value(v, "portlease_ports", state=st) for st in ("held", "free", "quarantined", "excluded")] == [
        7, 80, 2, 11]
    assert value(v, "portlease_largest_free_run") == 40
    assert [value(v, "portlease_leases", state=st) for st in metrics.LEASE_STATES] == [3, 0, 1]
    assert value(v, "portlease_clients") == 4
    assert value(v, "portlease_squatted_ports") == 5
    assert (value(v, "portlease_range_low"), value(v, "portlease_range_high")) == (10000, 10099)
    assert value(v, "portlease_grants_total") == 2
    assert value(v, "portlease_ports_granted_total") == 7
    assert value(v, "portlease_refusals_total", reason="exhausted") == 2
    assert value(v, "portlease_refusals_total", reason="quota") == 1
    assert value(v, "portlease_refusals_total", reason="too-large") == 0  # present before the first one
    assert value(v, "portlease_refusals_total", reason="busy") == 1
    assert value(v, "portlease_bind_check_failures_total", proto="tcp", family="ipv4") == 1
    assert value(v, "portlease_bind_check_failures_total", proto="tcp", family="ipv6") == 0
    assert value(v, "portlease_bind_check_failures_total", proto="udp", family="ipv6") == 2
    assert value(v, "portlease_reclaims_total") == 1
    assert value(v, "portlease_orphan_expiries_total") == 2
    assert value(v, "portlease_token_misses_total", op="reclaim", uid="1000") == 2
    assert value(v, "portlease_token_misses_total", op="release", uid="1000") == 1
    assert value(v, "portlease_token_misses_total", op="renew", uid="1001") == 1
    # Buckets are cumulative and a value on a bound falls in that bucket (le = "less or equal").
    name = "portlease_lease_duration_seconds"
    assert value(v, name + "_bucket", le="1.0") == 2
    assert value(v, name + "_bucket", le="5.0") == 3
    assert value(v, name + "_bucket", le="30.0") == 3
    assert value(v, name + "_bucket", le="60.0") == 4
    assert value(v, name + "_bucket", le="10800.0") == 4
    assert value(v, name + "_bucket", le="+Inf") == 5
    assert value(v, name + "_count") == 5
    assert value(v, name + "_sum") == pytest.approx(100047.7)


def test_a_fresh_broker_renders_zeros_and_no_squatter_gauge_when_not_looked() -> None:
    snap = Snapshot(ports_held=0, ports_free=100, ports_quarantined=0, ports_excluded=0, largest_free_run=100,
                    leases={}, clients=0, squatted_ports=None, range_low=1, range_high=100)
    families = list(om_parser.text_string_to_metric_families(Metrics().render(snap)))
    assert "portlease_squatted_ports" not in {f.name for f in families}
    v = samples(families)
    assert value(v, "portlease_grants_total") == 0
    assert [value(v, "portlease_leases", state=st) for st in metrics.LEASE_STATES] == [0, 0, 0]
    assert value(v, "portlease_lease_duration_seconds_bucket", le="+Inf") == 0


def test_label_values_are_escaped() -> None:
    m = Metrics()
    odd = 'a "quoted" back\\slash\nnewline'
    m.refused(odd)
    v = samples(list(om_parser.text_string_to_metric_families(m.render(SNAP))))
    assert value(v, "portlease_refusals_total", reason=odd) == 1


def test_token_misses_count_per_uid_over_every_op() -> None:
    """Issue 20: guessing tokens (83-85k guesses/s) left no trace. Each miss is counted by
    op and uid, and the call returns the uid's total, which the broker warns on."""
    m = Metrics()
    assert [m.token_missed(op, 7) for op in ("reclaim", "release", "reclaim")] == [1, 2, 3]
    assert m.token_missed("release", None) == 1
    families = list(om_parser.text_string_to_metric_families(m.render(SNAP)))
    v = samples(families)
    assert value(v, "portlease_token_misses_total", op="reclaim", uid="7") == 2
    assert value(v, "portlease_token_misses_total", op="release", uid="") == 1


def test_a_negative_or_nan_duration_counts_as_zero() -> None:
    m = Metrics()
    m.lease_ended(-3.0)
    m.lease_ended(float("nan"))
    v = samples(list(om_parser.text_string_to_metric_families(m.render(SNAP))))
    assert value(v, "portlease_lease_duration_seconds_bucket", le="1.0") == 2
    assert value(v, "portlease_lease_duration_seconds_sum") == 0


def test_classic_format_for_the_textfile_collector() -> None:
    text = busy().render(SNAP, openmetrics=False)
    assert "# EOF" not in text and "# UNIT" not in text
    # The classic format names a counter's family after its sample, suffix included.
    assert "# TYPE portlease_grants_total counter\n" in text
    families = list(classic_parser.text_string_to_metric_families(text))
    om = samples(list(om_parser.text_string_to_metric_families(busy().render(SNAP))))
    assert samples(families) == om  # the same numbers in both formats


def test_to_classic_is_the_classic_rendering() -> None:
    m = busy()
    assert metrics.to_classic(m.render(SNAP)) == m.render(SNAP, openmetrics=False)
    classic = m.render(SNAP, openmetrics=False)
    assert metrics.to_classic(classic) == classic


def test_write_textfile_writes_the_classic_format_whatever_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "portlease.prom"
    write_textfile(str(path), busy().render(SNAP))
    assert path.read_text() == busy().render(SNAP, openmetrics=False)


def test_every_metric_is_in_the_docs_table_and_every_documented_one_is_rendered() -> None:
    text = busy().render(SNAP)
    rendered = {f.name for f in om_parser.text_string_to_metric_families(text)}
    documented = set(re.findall(r"^\| `(portlease_[a-z_]+)` \|", DOCS.read_text(), re.M))
    counters = {n for n in rendered if f"# TYPE {n} counter" in text}
    # Counters are documented by their sample name (what a query names).
    assert documented == (rendered - counters) | {n + "_total" for n in counters}


# ---------------------------------------------------------------- the textfile


def test_write_textfile_replaces_atomically_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "portlease.prom"
    path.write_text("old\n")
    old_umask = os.umask(0o077)
    try:
        write_textfile(str(path), "new\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["portlease.prom"]  # no temporary file left


def test_a_reader_never_sees_half_a_file(tmp_path: Path) -> None:
    path = str(tmp_path / "portlease.prom")
    texts = ["a" * 300_000 + "\nportlease_clients 1\n", "b" * 200_000 + "\nportlease_clients 2\n"]
    write_textfile(path, texts[0])
    stop = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not stop.is_set():
            with open(path) as f:
                got = f.read()
            if got not in texts:
                seen.append(got[-20:])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            write_textfile(path, texts[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen == []


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    path = tmp_path / "portlease.prom"
    path.symlink_to(victim)
    write_textfile(str(path), "metrics\n")
    assert victim.read_text() == "keep\n"
    assert not path.is_symlink() and path.read_text() == "metrics\n"


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "is-a-directory.prom"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_textfile(str(target), "x\n")
    assert sorted(os.listdir(tmp_path)) == ["is-a-directory.prom"]
    with pytest.raises(FileNotFoundError):
        write_textfile(str(tmp_path / "missing" / "portlease.prom"), "x\n")


def test_another_user_can_read_the_textfile() -> None:
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to read as another uid")
    d = tempfile.mkdtemp(prefix="portlease-textfile-")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "portlease.prom")
        old_umask = os.umask(0o077)
        try:
            write_textfile(path, "portlease_clients 1\n")
        finally:
            os.umask(old_umask)
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path],
                             capture_output=True, text=True, check=True)
        assert out.stdout == "portlease_clients 1\n"
    finally:
        shutil.rmtree(d)


# ---------------------------------------------------------------- node_exporter itself

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


@pytest.fixture
def node_exporter(tmp_path: Path, port_range: str) -> Iterator[tuple[Path, str]]:
    """A real node_exporter with only its textfile collector, on a port of this test's range."""
    if NODE_EXPORTER is None:
        pytest.skip("node_exporter is not installed (Debian: prometheus-node-exporter)")
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    port = int(port_range.split("-")[0]) + 90
    proc = subprocess.Popen(
        [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={textdir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(500):  # until it listens (or dies)
            if proc.poll() is not None:
                pytest.fail(f"node_exporter exited: {proc.stderr.read() if proc.stderr else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            threading.Event().wait(0.02)
        else:
            pytest.fail("node_exporter never listened")
        yield textdir, f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.kill()
        proc.wait()


def scrape(url: str) -> dict[str, str]:
    """Metric family → its TYPE, as node_exporter serves them (classic format)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M)) | {
        "_scrape_error": re.search(r"^node_textfile_scrape_error (\S+)$", body, re.M).group(1),  # type: ignore[union-attr]
        "_body": body,
    }


def test_node_exporter_reads_the_textfile_with_its_types(node_exporter: tuple[Path, str]) -> None:
    textdir, url = node_exporter
    write_textfile(str(textdir / "portlease.prom"), busy().render(SNAP, openmetrics=False))
    got = scrape(url)
    assert got["_scrape_error"] == "0"
    assert got["portlease_grants_total"] == "counter"
    assert got["portlease_refusals_total"] == "counter"
    assert got["portlease_lease_duration_seconds"] == "histogram"
    assert got["portlease_ports"] == "gauge"
    assert 'portlease_bind_check_failures_total{family="ipv6",proto="udp"} 2' in got["_body"]


def test_node_exporter_loses_counter_types_from_openmetrics_text(node_exporter: tuple[Path, str]) -> None:
    # Why the textfile gets the classic format: the same numbers in OpenMetrics come out untyped.
    textdir, url = node_exporter
    (textdir / "portlease.tmp").write_text(busy().render(SNAP))  # as it is, not through write_textfile
    os.replace(textdir / "portlease.tmp", textdir / "portlease.prom")
    got = scrape(url)
    assert got["portlease_grants_total"] == "untyped"


# ---------------------------------------------------------------- a real broker end to end


def test_a_real_broker_counts_what_happened(tmp_path: Path, port_range: str,
                                            node_exporter: tuple[Path, str]) -> None:
    """Squatters, exclusions, a grant and refusals, seen through the metrics op and through node_exporter."""
    from brokerproc import BrokerProc, Raw

    textdir, url = node_exporter
    base = int(port_range.split("-")[0])
    v6 = socket.has_ipv6 and os.path.exists("/proc/net/tcp6")
    held = []
    try:
        # Two squatters at the bottom of the range, where the first grant is looked for.
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # SO_REUSEADDR: an earlier test's TIME_WAIT on this port must not fail the
        # bind; the socket still squats (the broker's probe binds without it).
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", base))
        held.append(tcp)
        udp = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if v6:
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        udp.bind(("::1" if v6 else "127.0.0.1", base + 1))
        held.append(udp)
        conf = tmp_path / "portlease.toml"
        conf.write_text(f'exclude = [{base + 40}, "{base + 45}-{base + 46}"]\n'
                        f'metrics_textfile = "{textdir / "portlease.prom"}"\n')
        broker = BrokerProc(tmp_path / "b", ["--config", str(conf)], range=f"{base}-{base + 49}")
        broker.dir.mkdir()
        broker.start()
        try:
            for _ in range(1000):  # the first write comes at the broker's first tick
                if (textdir / "portlease.prom").exists():
                    break
                threading.Event().wait(0.01)
            got = scrape(url)
            assert got["_scrape_error"] == "0"
            assert got["portlease_grants_total"] == "counter"
            assert re.search(r"^portlease_squatted_ports 2$", got["_body"], re.M), got["_body"]

            raw = Raw(broker.socket)
            granted = raw.call({"op": "lease", "count": 2})
            assert granted["ports"] == [base + 2, base + 3]
            assert raw.call({"op": "lease", "count": 500})["code"] == "too-large"
            assert raw.call({"op": "lease", "count": 45})["code"] == "exhausted"
            text = raw.call({"op": "metrics"})["text"]
            raw.close()
        finally:
            broker.stop()
    finally:
        for s in held:
            s.close()
    assert isinstance(text, str) and text.endswith("# EOF\n")
    v = samples(list(om_parser.text_string_to_metric_families(text)))
    assert value(v, "portlease_grants_total") == 1
    assert value(v, "portlease_ports_granted_total") == 2
    assert value(v, "portlease_refusals_total", reason="too-large") == 1
    assert value(v, "portlease_refusals_total", reason="exhausted") == 1
    assert value(v, "portlease_bind_check_failures_total", proto="tcp", family="ipv4") == 1
    assert value(v, "portlease_bind_check_failures_total", proto="udp", family="ipv6" if v6 else "ipv4") == 1
    assert value(v, "portlease_ports", state="held") == 2
    assert value(v, "portlease_ports", state="quarantined") == 2
    assert value(v, "portlease_ports", state="excluded") == 3
    assert value(v, "portlease_ports", state="free") == 50 - 2 - 2 - 3
    assert value(v, "portlease_leases", state="attached") == 1
    assert value(v, "portlease_clients") == 1
    assert (value(v, "portlease_range_low"), value(v, "portlease_range_high")) == (base, base + 49)
