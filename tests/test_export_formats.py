"""`hoptrace export` of recorded sample traces: HAR checked against the HAR 1.2 JSON Schema and
imported back, OTLP/JSON parsed back into the OpenTelemetry project's protobuf messages,
Parquet read back with pyarrow and DuckDB."""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import jsonschema
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from referencing import Registry, Resource

from hoptrace.analyzer import analyze
from hoptrace.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_traces"
SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "har_schema"


def hoptrace(*args: str) -> subprocess.CompletedProcess:
    """The command, run in this process by click's runner (the e2e tests run it as a child)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def har_validator() -> jsonschema.Validator:
    """The vendored HAR 1.2 schema (npm har-schema), its files linked by their $id."""
    schemas = {path.name: json.loads(path.read_text()) for path in SCHEMA_DIR.glob("*.json")}
    registry = Registry().with_resources((f"{name}#", Resource.from_contents(s)) for name, s in schemas.items())
    registry = registry.with_resources((name, Resource.from_contents(s)) for name, s in schemas.items())
    # With formats checked: the schema's serverIPAddress is oneOf ipv4/ipv6, which only formats tell apart.
    return jsonschema.Draft6Validator(schemas["har.json"], registry=registry, format_checker=jsonschema.Draft6Validator.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    db = out / "checkout.db"
    shutil.copy(SAMPLES / "checkout-expiry.db", db)  # a copy: the sample stays untouched by any reader
    done = hoptrace("export", db, "--har", out / "all.har", "--otlp", out / "all.jsonl", "--parquet", out / "parquet")
    assert done.returncode == 0, done.stderr
    return db, out


def test_har_is_valid_har_1_2_with_consistent_timings(exported):
    db, out = exported
    document = json.loads((out / "all.har").read_text())
    errors = sorted(har_validator().iter_errors(document), key=str)
    assert not errors, errors[:3]
    entries = document["log"]["entries"]
    conn = sqlite3.connect(db)
    hops = {row[0]: row for row in conn.execute("SELECT id, client_addr, duration_ms FROM hops")}
    assert len(entries) == len(hops)
    for entry in entries:
        timings = entry["timings"]
        assert entry["time"] == pytest.approx(sum(v for v in timings.values() if v != -1), abs=0.002)
        assert min(timings["send"], timings["wait"], timings["receive"]) >= 0
        hop_id, client_addr, duration_ms = hops[entry["_hoptrace"]["hop_id"]]
        assert entry["time"] == pytest.approx(duration_ms, abs=0.01)
        assert entry["connection"] == client_addr
        assert entry["response"]["content"]["mimeType"]  # never an empty content object


def test_har_carries_the_analysis(exported):
    db, out = exported
    entries = json.loads((out / "all.har").read_text())["log"]["entries"]
    analysis = analyze(db)
    by_id = {e["_hoptrace"]["hop_id"]: e["_hoptrace"] for e in entries}
    for hop_id, hop in analysis.hops.iterrows():
        fields = by_id[hop_id]
        assert fields["request"] == hop["trace"] and fields["link"] == hop["link"]
        assert fields["parent_hop"] == (None if pd_na(hop["parent_id"]) else int(hop["parent_id"]))
    expected = Counter((kind, int(h)) for kind, ids in zip(analysis.findings["kind"], analysis.findings["hop_ids"], strict=True) for h in ids)
    carried = Counter((f["kind"], hop_id) for hop_id, fields in by_id.items() for f in fields["findings"])
    assert carried == expected and carried["expired_mid_flow", next(h for k, h in carried if k == "expired_mid_flow")]


def pd_na(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_har_filters(exported, tmp_path):
    db, _ = exported
    assert hoptrace("export", db, "--har", tmp_path / "expired.har", "--finding", "expired_mid_flow").returncode == 0
    entries = json.loads((tmp_path / "expired.har").read_text())["log"]["entries"]
    requests = {e["_hoptrace"]["request"] for e in entries}
    assert len(requests) == 1 and any(f["kind"] == "expired_mid_flow" for e in entries for f in e["_hoptrace"]["findings"])
    (request,) = requests
    assert hoptrace("export", db, "--har", tmp_path / "one.har", "--trace", request).returncode == 0
    one = json.loads((tmp_path / "one.har").read_text())["log"]["entries"]
    assert sorted(e["_hoptrace"]["hop_id"] for e in one) == sorted(e["_hoptrace"]["hop_id"] for e in entries)
    started = sqlite3.connect(db).execute("SELECT started_at FROM hops WHERE id = ?", (request,)).fetchone()[0]
    window_args = ("--since", f"{started - 0.001:.6f}", "--until", f"{started + 0.001:.6f}")
    assert hoptrace("export", db, "--har", tmp_path / "window.har", *window_args).returncode == 0
    window = json.loads((tmp_path / "window.har").read_text())["log"]["entries"]
    assert {e["_hoptrace"]["request"] for e in window} == {request}
    bad = hoptrace("export", db, "--har", tmp_path / "x.har", "--finding", "no_such_kind")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not a finding kind" in bad.stderr
    assert not (tmp_path / "x.har").exists()


def test_exported_har_imports_to_the_same_hops(exported, tmp_path):
    db, out = exported
    again = tmp_path / "again.db"
    done = hoptrace("import", out / "all.har", "--db", again)
    assert done.returncode == 0 and "0 addon errors" in done.stdout, done.stdout + done.stderr
    columns = "service, method, path, query, status, error, client_addr, request_size, response_size, http_version"
    original = sqlite3.connect(db).execute(f"SELECT {columns}, started_at, ended_at FROM hops ORDER BY started_at, id").fetchall()
    imported = sqlite3.connect(again).execute(f"SELECT {columns}, started_at, ended_at FROM hops ORDER BY started_at, id").fetchall()
    assert [row[:-2] for row in imported] == [row[:-2] for row in original]
    for a, b in zip(imported, original, strict=True):
        assert a[-2] == pytest.approx(b[-2], abs=2e-6) and a[-1] == pytest.approx(b[-1], abs=5e-6)
    entry = sqlite3.connect(again).execute("SELECT entry FROM captures").fetchone()[0]
    assert entry == sqlite3.connect(db).execute("SELECT entry FROM captures").fetchone()[0]


def parse_otlp_line(line: str) -> ExportTraceServiceRequest:
    """OTLP/JSON ids are hex; protobuf's JSON mapping wants base64: convert, then Parse."""
    document = json.loads(line)
    for resource in document["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        assert len(span[key]) == (32 if key == "traceId" else 16) and int(span[key], 16) >= 0
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                assert isinstance(span["kind"], int) and isinstance(span["startTimeUnixNano"], str)
    return json_format.Parse(json.dumps(document), ExportTraceServiceRequest())


def otlp_spans(path: Path) -> list[tuple[str, object]]:
    spans = []
    for line in path.read_text().splitlines():
        message = parse_otlp_line(line)
        for resource in message.resource_spans:
            (service,) = [a.value.string_value for a in resource.resource.attributes if a.key == "service.name"]
            for scope in resource.scope_spans:
                spans += [(service, span) for span in scope.spans]
    return spans


def test_otlp_one_span_per_hop_parents_in_the_same_trace_findings_as_events(exported):
    db, out = exported
    spans = otlp_spans(out / "all.jsonl")
    analysis = analyze(db)
    attrs = [{a.key: a.value for a in span.attributes} for _, span in spans]
    assert sorted(a["hoptrace.hop.id"].int_value for a in attrs) == sorted(analysis.hops.index)
    ids = {(span.trace_id, span.span_id) for _, span in spans}
    for (service, span), attr in zip(spans, attrs, strict=True):
        assert span.kind == 2 and span.end_time_unix_nano >= span.start_time_unix_nano
        assert service == analysis.hops.at[attr["hoptrace.hop.id"].int_value, "service"]
        if span.parent_span_id:
            assert (span.trace_id, span.parent_span_id) in ids
        else:
            assert attr["hoptrace.link"].string_value == "root"
    events = Counter((e.name, a["hoptrace.hop.id"].int_value) for (_, span), a in zip(spans, attrs, strict=True) for e in span.events)
    expected = Counter((kind, int(h)) for kind, ids_ in zip(analysis.findings["kind"], analysis.findings["hop_ids"], strict=True) for h in ids_)
    assert events == expected
    failed = [span for _, span in spans if span.status.code == 2]
    assert failed and all(any(a.key == "http.response.status_code" and a.value.int_value >= 400 for a in s.attributes) for s in failed)
    subs = {a["enduser.id"].string_value for a in attrs if "enduser.id" in a}
    assert subs == set(analysis.tokens["sub"].dropna()) - {""}


def test_otlp_keeps_the_services_own_trace_ids(tmp_path):
    db = tmp_path / "propagated.db"
    shutil.copy(SAMPLES / "propagated.db", db)
    assert hoptrace("export", db, "--otlp", tmp_path / "p.jsonl").returncode == 0
    spans = otlp_spans(tmp_path / "p.jsonl")
    propagated = dict(sqlite3.connect(db).execute("SELECT id, trace_id FROM hops WHERE trace_source = 'traceparent'").fetchall())
    assert propagated
    checked = 0
    for _, span in spans:
        hop_id = next(a.value.int_value for a in span.attributes if a.key == "hoptrace.hop.id")
        if hop_id in propagated:  # the client's own request to the gateway carries none
            assert span.trace_id.hex() == propagated[hop_id]
            checked += 1
    assert checked == len(propagated)


def test_parquet_reads_back_with_pyarrow_and_duckdb(exported):
    db, out = exported
    conn = sqlite3.connect(db)
    for table in ("hops", "tokens", "hop_tokens"):
        stored = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        assert pq.read_table(out / "parquet" / f"{table}.parquet").num_rows == stored
        assert duckdb.connect().execute(f"SELECT count(*) FROM '{out / 'parquet' / table}.parquet'").fetchall() == [(stored,)]
    analysis = analyze(db)
    assert pq.read_table(out / "parquet" / "traces.parquet").num_rows == len(analysis.hops)
    assert pq.read_table(out / "parquet" / "findings.parquet").num_rows == len(analysis.findings)
    expired = duckdb.connect().execute(
        f"SELECT h.service, h.path, h.status FROM '{out}/parquet/findings.parquet' f, unnest(f.hop_ids) AS u(hop_id)"
        f" JOIN '{out}/parquet/hops.parquet' h ON h.id = u.hop_id WHERE f.kind = 'expired_mid_flow' ORDER BY h.started_at"
    ).fetchall()
    assert ("auth", "/introspect", 401) in expired


# -- where an export goes ------------------------------------------------------------


def test_export_follows_a_symlink_and_writes_into_a_fifo(exported, tmp_path):
    """A rename over the path would turn a fifo (or /dev/stdout) into a regular file and a link into a copy."""
    import os
    import stat
    import threading

    db, _ = exported
    fifo, target, link = tmp_path / "p.har", tmp_path / "t.jsonl", tmp_path / "l.jsonl"
    os.mkfifo(fifo)
    target.write_text("keep\n")
    link.symlink_to(target.name)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    done = hoptrace("export", db, "--har", fifo, "--otlp", link)
    reader.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink() and os.readlink(link) == target.name
    har_validator().validate(json.loads(received[0]))
    assert len(target.read_text().splitlines()) > 1 and not list(tmp_path.glob(".*.partial"))


def test_export_usage_errors_are_one_line(exported, tmp_path):
    db, _ = exported
    for args in (["--parquet", db], ["--har", tmp_path]):
        done = hoptrace("export", db, *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)


# -- a hostile trace file ------------------------------------------------------------------

hostile_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["²", "٣٠٠", "200", "NaN", "inf", "-inf", "1e999", '[["a", 5]]', "5", "{}", "null",
                     '[["x-\\ud800", "[redacted:\\udfff"], ["Retry-After", "\\uDBFF1"]]']),  # lone surrogates, spelled in JSON
    st.binary(max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.none(),
)
HOSTILE_COLUMNS = ["status", "port", "started_at", "ended_at", "request_end_at", "response_start_at", "connect_at", "connected_at",
                   "request_headers", "response_headers", "method", "path", "query", "host", "scheme", "request_size", "response_size",
                   "error", "failed", "client_addr", "http_version", "reason", "request_body", "response_body"]  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(HOSTILE_COLUMNS), hostile_values, st.booleans()), min_size=1, max_size=4))
def test_export_of_a_hostile_trace_file_is_valid_output_or_one_line(tmp_path_factory, changes):
    tmp = tmp_path_factory.mktemp("hostile")
    db = tmp / "h.db"
    shutil.copy(SAMPLES / "checkout-expiry.db", db)
    conn = sqlite3.connect(db)
    with conn:
        for column, value, every_hop in changes:
            where = "" if every_hop else " WHERE id = (SELECT min(id) FROM hops)"
            with contextlib.suppress(sqlite3.IntegrityError):  # NULL where the schema says NOT NULL: no file holds it
                conn.execute(f"UPDATE hops SET {column} = ?{where}", (value,))
    conn.close()
    done = hoptrace("export", db, "--har", tmp / "h.har", "--otlp", tmp / "h.jsonl", "--parquet", tmp / "pq")
    if done.returncode == 2:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        return
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp / "h.har").read_text())
    har_validator().validate(document)
    assert all(isinstance(entry["response"]["status"], int) for entry in document["log"]["entries"])
    for line in (tmp / "h.jsonl").read_text().splitlines():
        parse_otlp_line(line)
    assert pq.read_table(tmp / "pq" / "hops.parquet").num_rows == len(document["log"]["entries"])


def _keyless_copy(source: Path, target: Path) -> Path:
    """``source`` with its hops table rebuilt without its key, a third of the ids as text and a third as reals between integers."""
    shutil.copy(source, target)
    conn = sqlite3.connect(target)
    ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'hops'").fetchone()[0]
    keyless = re.sub(r"\bid\s+INTEGER PRIMARY KEY", "id", ddl).replace("CREATE TABLE hops", "CREATE TABLE hops_keyless", 1)
    conn.executescript(
        f"PRAGMA foreign_keys = OFF; {keyless}; INSERT INTO hops_keyless SELECT * FROM hops; DROP TABLE hops;"
        " ALTER TABLE hops_keyless RENAME TO hops;"
        " UPDATE hops SET id = CAST(id AS TEXT) WHERE id % 3 = 0; UPDATE hops SET id = id + 0.5 WHERE id % 3 = 1;"
    )
    conn.commit()
    assert {kind for (kind,) in conn.execute("SELECT DISTINCT typeof(id) FROM hops")} == {"integer", "real", "text"}
    conn.close()
    return target


@pytest.mark.parametrize("files", ["one file", "two files", "a keyless hops table"])
def test_a_selections_hops_are_the_stored_rows_of_exactly_its_ids(files, tmp_path):
    """Exports read only the rows a selection can hold (its ids' range): none of its hops may be left out,
    none added, and each must be the stored row, typed as the whole file's export types it."""
    from hoptrace.db import COLUMNS
    from hoptrace.exchange._select import select

    dbs = {
        "one file": (SAMPLES / "checkout-expiry.db",),
        "two files": (SAMPLES / "checkout-expiry.db", SAMPLES / "flaky-retries.db"),
        "a keyless hops table": (_keyless_copy(SAMPLES / "checkout-expiry.db", tmp_path / "keyless.db"),),
    }[files]
    everything = select(dbs)
    starts = sorted(hop["started_at"] for hop in everything.hops())
    since = datetime.datetime.fromtimestamp(starts[len(starts) // 2], datetime.UTC).isoformat()
    part = select(dbs, since=since)
    assert 0 < len(part.hop_ids) < len(everything.hop_ids)
    def row(hop: dict) -> dict:
        return {name: value for name, value in hop.items() if name in COLUMNS["hops"]}

    whole = {hop["id"]: row(hop) for hop in everything.hops() if hop["id"] in part.hop_ids}
    read = {hop["id"]: row(hop) for hop in part.hops()}
    assert read == whole and set(read) == {i for i in part.hop_ids if i in whole}


def test_parquet_of_a_keyless_table_holds_every_analysed_hop_and_sighting(tmp_path):
    """hops.parquet and traces.parquet name the same hops, also when the stored ids are text or fractional
    reals (a hostile table without its key), and hop_tokens.parquet holds every sighting the analysis
    linked, also when its hop ids are reals: both ids are typed as the analysis types them before the check."""
    from hoptrace.exchange._parquet import write_parquet
    from hoptrace.exchange._select import select

    db = _keyless_copy(SAMPLES / "checkout-expiry.db", tmp_path / "keyless.db")
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE hop_tokens SET hop_id = hop_id + 0.5 WHERE hop_id % 2 = 0")
    selection = select([db])
    counts = write_parquet(selection, tmp_path / "out")
    hops = pq.read_table(tmp_path / "out" / "hops.parquet").column("id").to_pylist()
    traces = pq.read_table(tmp_path / "out" / "traces.parquet").column("hop_id").to_pylist()
    # The keyless table declares no type for id: Parquet takes the file's declared types, text here.
    assert counts["hops"] == counts["traces"] > 0 and sorted(map(int, hops)) == sorted(traces)
    sightings = pq.read_table(tmp_path / "out" / "hop_tokens.parquet").to_pydict()
    written = set(zip(sightings["hop_id"], sightings["fingerprint"], strict=True))
    linked = selection.analysis.hop_tokens
    assert set(zip(linked["hop_id"].tolist(), linked["fingerprint"].astype(str).tolist(), strict=True)) <= written
    assert {hop_id for hop_id, _ in written} <= set(traces)


_CLAIM = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.sampled_from([0.0, -0.0]),
    st.text(max_size=4), st.text(min_size=250, max_size=260), st.lists(st.integers(0, 3), max_size=2),
)  # fmt: skip


@functools.cache
def _a_hop_with_a_token() -> dict:
    from hoptrace.exchange._select import select

    return next(h for h in select([SAMPLES / "checkout-expiry.db"]).hops() if h["token_fp"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_CLAIM, _CLAIM), min_size=2, max_size=8))
def test_span_attributes_keep_each_values_own_type_whatever_spans_came_before(claims):
    """Span attributes come from kept encodings of recurring values: True, 1 and 1.0 are equal
    Python keys but a bool, an int and a double attribute, 0.0 and -0.0 two doubles, and a list
    is no key at all."""
    from hoptrace.exchange._otlp import request_message

    hop = _a_hop_with_a_token()
    for iat, sub in claims:
        message = request_message([hop], {hop["token_fp"]: {"iat": iat, "sub": sub}})
        (span,) = message.resource_spans[0].scope_spans[0].spans
        attributes = {a.key: a.value for a in span.attributes}
        for key, claim in (("hoptrace.token.iat", iat), ("enduser.id", sub)):
            if claim is None:
                assert key not in attributes
                continue
            field = {bool: "bool_value", int: "int_value", float: "double_value"}.get(type(claim), "string_value")
            assert attributes[key].WhichOneof("value") == field
            expected = claim if field != "string_value" else str(claim)
            assert repr(getattr(attributes[key], field)) == repr(expected)  # repr: -0.0 is not 0.0


def test_long_attribute_values_are_encoded_each_time_not_kept():
    """Kept encodings are for short recurring values: a path or claim tens of KiB long, on many
    hops, would otherwise fill the streaming process's memory."""
    from hoptrace.exchange import _otlp

    hop = _a_hop_with_a_token()
    _otlp.request_message([hop], {hop["token_fp"]: {"sub": "short"}})  # the hop's recurring values, kept once
    before = _otlp._encoded_kept.cache_info().currsize
    for n in range(50):
        _otlp.request_message([hop], {hop["token_fp"]: {"sub": f"{n}-" + "x" * 20_000}})
    assert _otlp._encoded_kept.cache_info().currsize == before


def test_an_export_is_the_same_bytes_in_every_process(exported, tmp_path):
    """Exports can be diffed and hashed: nothing in them follows a process's string hash seed."""
    db, _ = exported
    outputs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        out.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "hoptrace", "export", str(db), "--otlp", str(out / "o.jsonl"), "--har", str(out / "h.har"),
             "--parquet", str(out / "parquet")],
            env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.append({path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()})
    assert len(outputs[0]) == 7 and all(outputs[0].values())  # the OTLP file, the HAR, five Parquet tables
    assert outputs[0] == outputs[1] == outputs[2]
