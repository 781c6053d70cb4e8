"""The results store: one writer at a time (real processes), fresh lines after a crash,
one schema checked on read."""

import json
import warnings

import pytest

from hlh_mlx import store

from .conftest import python, record

APPENDS = 400


def test_pack_installs_during_appends_lose_no_record(store_dir):
    """A sweep appending while `pull`/`remove` replace the same file: every appended record
    survives (the replacement used to read, then write the file back without a lock)."""
    path = store_dir / "emulator" / "matmul.jsonl"
    store.append(path, record(-1))
    appender = python(f"""
        from pathlib import Path
        from hlh_mlx import store
        from tests.store.conftest import record
        for i in range({APPENDS}):
            store.append(Path({str(path)!r}), record(i))
    """)
    replacer = python("""
        from hlh_mlx import hub
        from tests.store.conftest import record
        pack = [record(1000 + i, source="hub:me/pack@abc") for i in range(20)]
        n = 0
        while n < 300:
            hub._replace_results("me/pack", ["emulator"], {"matmul": pack} if n % 2 == 0 else {})
            n += 1
        hub._replace_results("me/pack", ["emulator"], {"matmul": pack})
    """)
    for p in (appender, replacer):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    recs = store.read(path)
    local = [r["variant_id"] for r in recs if r["source"] == "local"]
    assert local == ["v-1"] + [f"v{i}" for i in range(APPENDS)]  # nothing lost, order kept
    assert sorted(r["variant_id"] for r in recs if r["source"] != "local") == sorted(f"v{1000 + i}" for i in range(20))


def test_concurrent_appenders_never_interleave(store_dir):
    path = store_dir / "emulator" / "matmul.jsonl"
    big = "x" * 70000  # larger than a pipe buffer: one write, but only the lock keeps lines whole
    procs = [python(f"""
        from pathlib import Path
        from hlh_mlx import store
        from tests.store.conftest import record
        for i in range(40):
            store.append(Path({str(path)!r}), record({k} * 100 + i, error={big!r}))
    """) for k in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = store.read(path)
    assert len(recs) == 120


def test_append_after_a_partial_last_line_starts_a_fresh_line(store_dir):
    path = store_dir / "emulator" / "matmul.jsonl"
    store.append(path, record(1))
    with open(path, "ab") as f:
        f.write(json.dumps(record(2)).encode()[:40])  # a crash mid-write: no newline
    store.append(path, record(3))
    with pytest.warns(RuntimeWarning, match=r"matmul.jsonl:2: skipping a corrupt results line"):
        recs = store.read(path)
    assert [r["variant_id"] for r in recs] == ["v1", "v3"]


def test_partial_last_line_is_reported_as_an_interrupted_write(store_dir):
    path = store_dir / "emulator" / "matmul.jsonl"
    store.append(path, record(1))
    with open(path, "ab") as f:
        f.write(b'{"op": "mat')
    with pytest.warns(RuntimeWarning, match=r"matmul.jsonl:2: .*interrupted write"):
        assert [r["variant_id"] for r in store.read(path)] == ["v1"]


@pytest.mark.parametrize("line,why", [
    ('{"schema":1,"template":"builtin"}', "missing fields op, device, backend"),
    (json.dumps(record(1, shape="64x64")), "field 'shape' is str, expected dict"),
    (json.dumps(record(1, timing={"median_ms": "fast"})), "median_ms is not a positive number"),
    (json.dumps(record(1, correct="yes")), "field 'correct' is str, expected bool"),
    ("[1, 2]", "not an object"),
])
def test_a_line_that_does_not_match_the_schema_is_skipped_naming_file_and_line(store_dir, line, why):
    path = store_dir / "emulator" / "matmul.jsonl"
    store.append(path, record(1))
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.warns(RuntimeWarning, match=rf"matmul.jsonl:2: .*does not match the schema.*{why}"):
        assert len(store.read(path)) == 1


def test_a_replacement_keeps_lines_it_cannot_read(store_dir):
    """Nothing lost: a pack install drops only its own records, never a corrupt local line."""
    from hlh_mlx import hub
    path = store_dir / "emulator" / "matmul.jsonl"
    store.append(path, record(1))
    with open(path, "a") as f:
        f.write('{"half a line\n')
    with pytest.warns(RuntimeWarning):
        hub._replace_results("me/pack", ["emulator"], {"matmul": [record(9, source="hub:me/pack@abc")]})
    assert '{"half a line' in path.read_text()


def test_retryable_failures_are_the_environmental_ones():
    assert store.retryable(record(1, status="timeout", correct=False))
    assert store.retryable(record(1, status="crashed", correct=False))
    assert store.retryable(record(1, status="error", correct=False, error="[emulator] no C++ compiler found (tried "
                                  "g++). Install one: `apt-get install g++`"))
    assert not store.retryable(record(1, status="compile_error", correct=False, error="source:3: error: x"))
    assert not store.retryable(record(1, status="incorrect", correct=False, error="max rel err 0.5"))
    assert not store.retryable(record(1))


def test_a_record_that_does_not_match_the_schema_is_refused_on_write(store_dir):
    path = store_dir / "emulator" / "matmul.jsonl"
    with pytest.raises(store.RecordError, match="missing field backend"):
        store.append(path, {k: v for k, v in record(1).items() if k != "backend"})
    assert not path.exists() or path.read_text() == ""
