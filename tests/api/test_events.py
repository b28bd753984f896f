"""The event monitor writes Cloud Hypervisor's event stream."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strato.vmm.config import ConfigError
from strato.vmm.events import EventMonitor, format_event, parse_events


def test_format_is_cloud_hypervisors() -> None:
    # serde_json's to_string_pretty of event_monitor::Event (a Duration, then the strings).
    assert format_event(1_500_000_123, "vm", "booted") == (
        "{\n"
        '  "timestamp": {\n'
        '    "secs": 1,\n'
        '    "nanos": 500000123\n'
        "  },\n"
        '  "source": "vm",\n'
        '  "event": "booted",\n'
        '  "properties": null\n'
        "}"
    )
    assert '"properties": {\n    "id": "_disk0"\n  }' in format_event(0, "d", "e", {"id": "_disk0"})


def test_stream_of_events_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "events"
    ticks = iter(range(0, 10**10, 10**9))
    mon = EventMonitor(os.open(path, os.O_WRONLY | os.O_CREAT), clock=lambda: next(ticks))
    mon.emit("vmm", "starting")
    mon.emit("vm", "shutdown", {"reason": "poweroff"})
    mon.close()
    text = path.read_text()
    assert text.endswith("}\n\n") and text.count("}\n\n{") == 1
    events = parse_events(text)
    assert [e["event"] for e in events] == ["starting", "shutdown"]
    assert events[1]["timestamp"] == {"secs": 2, "nanos": 0}
    assert events[1]["properties"] == {"reason": "poweroff"}
    mon.emit("vm", "late")  # after close: dropped, no error


def test_option_parsing(tmp_path: Path) -> None:
    mon = EventMonitor.from_option(f"path={tmp_path / 'e'}")
    mon.emit("vmm", "starting")
    mon.close()
    assert parse_events((tmp_path / "e").read_text())[0]["source"] == "vmm"
    r, w = os.pipe()
    mon = EventMonitor.from_option(f"fd={w}")
    mon.emit("vm", "booted")
    mon.close()
    with os.fdopen(r) as f:
        assert parse_events(f.read())[0]["event"] == "booted"
    for bad in ("", "path=", "file=/x", "fd=abc", "fd=987654", f"path={tmp_path}/no/such/dir/e"):
        with pytest.raises(ConfigError, match="--event-monitor"):
            EventMonitor.from_option(bad)


def test_a_reader_that_does_not_read_never_blocks_the_vmm() -> None:
    r, w = os.pipe()
    mon = EventMonitor(w, max_pending=8)
    for i in range(5000):  # far more than a pipe holds
        mon.emit("vm", "event", {"n": str(i)})
    assert mon.dropped > 0
    mon.close(timeout=0.2)  # the writer is stuck on the full pipe: close returns anyway
    os.close(r)
