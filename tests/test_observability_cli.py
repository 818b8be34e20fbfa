"""nexusctl top's rendering: rates between two usage documents, shares and quantiles in milliseconds."""

from __future__ import annotations

from nexus.observability.cli import render


def usage(at: float, requests: int) -> dict:
    row = {
        "name": "acme",
        "requests": requests,
        "errors": requests // 10,
        "client_errors": 0,
        "rate_limited": requests // 5,
        "bytes": 1000,
        "latency_s": {"p50": 0.0012, "p90": 0.004, "p99": None},
    }
    return {"time": at, "since": 0.0, "records": requests, "consumers": [row], "routes": [{**row, "name": "orders"}]}


def test_first_screen_has_no_rates():
    text = render(usage(100.0, 50))
    acme = next(line for line in text.splitlines() if line.startswith("acme"))
    assert acme.split() == ["acme", "-", "50", "10.0%", "20.0%", "1000", "1.2", "4.0", "-"]


def test_rates_come_from_the_previous_document():
    text = render(usage(102.0, 250), usage(100.0, 50))
    assert "rates over the last 2.0 s" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("acme", "orders"))]
    assert [row[1] for row in rows] == ["100.0", "100.0"]


def test_row_below_the_previous_cut_has_no_rate():
    previous = usage(100.0, 50)
    current = usage(101.0, 80)
    current["consumers"].append({**current["consumers"][0], "name": "newcomer", "requests": 30})
    # The previous document held `limit` rows: newcomer may have been just below the cut.
    rows = {line.split()[0]: line.split() for line in render(current, previous, limit=1).splitlines() if line.startswith(("acme", "newcomer"))}
    assert rows["acme"][1] == "30.0"
    assert rows["newcomer"][1] == "-"
    # With room to spare, a missing row had no requests before.
    rows = {line.split()[0]: line.split() for line in render(current, previous, limit=10).splitlines() if line.startswith("newcomer")}
    assert rows["newcomer"][1] == "30.0"


def test_usage_off_is_said():
    document = {**usage(100.0, 0), "recording": False}
    assert "usage is off" in render(document)
    assert "usage is off" not in render(usage(100.0, 0))
