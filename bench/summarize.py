#!/usr/bin/env python3
"""The comparison table of one bench/run.sh run, in markdown.

    python3 bench/summarize.py bench/results/<run>

Reads results.jsonl (loadgen's RESULT lines, labelled by cell), and, when the
peers ran, peers.jsonl and raw-sql/summary.tsv. Every figure is the median
over the cell's runs; the spread is (max - min) / 2 / median. Ratios compare
medians from this same run. Runs marked discarded (other processes took more
than FOREIGN_MAX cores meanwhile) are left out, and counted.
"""

import csv
import json
import os
import statistics as st
import sys
from collections import OrderedDict


def load(out):
    cells, discarded = OrderedDict(), OrderedDict()
    for line in open(os.path.join(out, "results.jsonl")):
        result = json.loads(line)
        if result.get("discarded"):
            discarded[result["label"]] = discarded.get(result["label"], 0) + 1
        else:
            cells.setdefault(result["label"], []).append(result)
    peers = OrderedDict()
    path = os.path.join(out, "peers.jsonl")
    if os.path.exists(path):
        for line in open(path):
            run = json.loads(line)
            if not run["discarded"]:
                peers.setdefault(f'{run["system"]} {run["config"]}', []).append(run)
    raw = OrderedDict()
    path = os.path.join(out, "raw-sql", "summary.tsv")
    if os.path.exists(path):
        for row in csv.DictReader(open(path), delimiter="\t"):
            raw.setdefault(f'{row["scenario"]} c{row["clients"]}', []).append(row)
    return cells, peers, raw, discarded


def median(runs, *path):
    values = []
    for run in runs:
        for key in path:
            run = run.get(key) if isinstance(run, dict) else None
        if run is not None:
            values.append(float(run))
    return st.median(values) if values else None


def spread(values):
    m = st.median(values)
    return f"{min(values):,.0f}–{max(values):,.0f} (±{(max(values) - min(values)) / 2 / m * 100:.0f}%)"


def fmt(value, digits=1):
    return "–" if value is None else f"{value:,.{digits}f}"


def latencies(runs, key):
    return " / ".join(fmt(median(runs, key, p)) for p in ("p50", "p99", "p999"))


def burn_downs(cells):
    print("### Burn-down: 32 workers (the ceiling: C connections), claim B, complete them, until empty\n")
    print("| cell | runs | invoices/s | min–max (spread) | claim ms p50 / p99 / p999 "
          "| complete ms p50 / p99 / p999 | WAL bytes / invoice | service peak RSS MiB | service cores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, runs in cells.items():
        if runs[0]["mode"] not in ("burn-down", "ceiling"):
            continue
        rates = [r["invoices_per_s"] for r in runs]
        print(f"| {label} | {len(runs)} | {st.median(rates):,.0f} | {spread(rates)} "
              f"| {latencies(runs, 'claim_ms')} | {latencies(runs, 'complete_ms')} "
              f"| {fmt(median(runs, 'wal_bytes_per_invoice'), 0)} "
              f"| {fmt(median(runs, 'service', 'peak_rss_mib'))} | {fmt(median(runs, 'service', 'cpu_cores'), 2)} |")
    print()


def pickups(cells):
    idle = [(label, runs) for label, runs in cells.items() if runs[0]["mode"] == "idle-pickup"]
    if idle:
        print("### Idle pickup: 32 workers long-polling, one invoice submitted at a time\n")
        print("| cell | runs | tries | pickup ms p50 / p99 / max | submit call ms p50 "
              "| database transactions per pickup | service peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for label, runs in idle:
            print(f"| {label} | {len(runs)} | {sum(r['tries'] for r in runs)} "
                  f"| {fmt(median(runs, 'pickup_ms', 'p50'))} / {fmt(median(runs, 'pickup_ms', 'p99'))} "
                  f"/ {fmt(max(r['max_ms'] for r in runs))} | {fmt(median(runs, 'submit_ms', 'p50'))} "
                  f"| {fmt(median(runs, 'db_transactions_per_pickup'))} "
                  f"| {fmt(median(runs, 'service', 'peak_rss_mib'))} |")
        print()
    search = cells.get("sustained search", [])
    maxima = [r["invoices_per_s"] for r in cells.get("sustained max", [])]
    if search:
        print("### Sustained search: the highest submit rate kept up with, by bisection in each round\n")
        print(f"Highest rate kept up with: {st.median(maxima):,.0f}/s, {spread(maxima)} over {len(maxima)} rounds "
              "(kept up: at least 99% completed over the window, pickup p50 under 100 ms).\n")
        print("| step | rate/s | achieved/s | pickup ms p50 / p99 | kept up |")
        print("|---|---|---|---|---|")
        for i, r in enumerate(search, 1):
            print(f"| {i} | {r['rate']:,} | {r['achieved_per_s']:,.0f} "
                  f"| {fmt(r['pickup_ms']['p50'])} / {fmt(r['pickup_ms']['p99'])} | {'yes' if r['kept_up'] else 'no'} |")
        print()
    sustained = [(label, runs) for label, runs in cells.items()
                 if runs[0]["mode"] == "sustained" and label != "sustained search"]
    if sustained:
        print("### Sustained: a producer submits at a fixed rate, 32 workers long-poll for 10 at a time\n")
        print("| cell | runs | rate/s | achieved/s | runs kept up | pickup ms p50 / p99 / p999 "
              "| claim ms p50 / p99 / p999 (claims that found work waiting) | claims timed "
              "| service peak RSS MiB | service cores |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label, runs in sustained:
            kept = (f'{sum(1 for r in runs if r["kept_up"])} of {len(runs)}'
                    if all("kept_up" in r for r in runs) else "–")
            timed = " / ".join(str(r.get("claims_timed", "–")) for r in runs)
            print(f"| {label} | {len(runs)} | {fmt(median(runs, 'rate'), 0)} | {fmt(median(runs, 'achieved_per_s'), 0)} "
                  f"| {kept} | {latencies(runs, 'pickup_ms')} | {latencies(runs, 'claim_ms')} | {timed} "
                  f"| {fmt(median(runs, 'service', 'peak_rss_mib'))} | {fmt(median(runs, 'service', 'cpu_cores'), 2)} |")
        print()


def peer_tables(peers, raw):
    if raw:
        print("### Reference: pgbench on a generic claim/complete schema (../shared/bench/peers/raw-sql)\n")
        print("| scenario | runs | rows/s | min–max (spread) | claim / complete statement ms |")
        print("|---|---|---|---|---|")
        for name, rows in raw.items():
            rates = [float(r["rows_per_s"]) for r in rows]
            claim = st.median(float(r["claim_ms"]) for r in rows)
            complete = st.median(float(r["complete_ms"]) for r in rows)
            print(f"| {name} | {len(rows)} | {st.median(rates):,.0f} | {spread(rates)} | {claim:.1f} / {complete:.1f} |")
        print()
    if peers:
        print("### Peers: one worker process with about 32 slots drains the jobs (../shared/bench/peers)\n")
        print("| system | runs | jobs | jobs/s | min–max (spread) | worker peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for name, runs in peers.items():
            rates = [r["jobs_per_s"] for r in runs]
            print(f"| {name} {runs[0]['version']} | {len(runs)} | {runs[0]['jobs']:,} | {st.median(rates):,.0f} "
                  f"| {spread(rates)} | {st.median(r['peak_rss_mb'] for r in runs):.0f} |")
        print()


def targets(cells, peers, raw):
    def rate(label):
        runs = cells.get(label)
        return st.median(r["invoices_per_s"] for r in runs) if runs else None

    def peer(name):
        runs = peers.get(name)
        return st.median(r["jobs_per_s"] for r in runs) if runs else None

    def generic(name):
        rows = raw.get(name)
        return st.median(float(r["rows_per_s"]) for r in rows) if rows else None

    def ratio(a, b):
        return None if a is None or not b else a / b

    def row(target, measured, value, goal, met):
        verdict = "–" if value is None else ("met" if met(value) else "missed")
        print(f"| {target} | {measured} | {fmt(value, 2)} | {goal} | {verdict} |")

    print("### Targets (ratios of medians from this run)\n")
    print("| target | measured | ratio or value | goal | |")
    print("|---|---|---|---|---|")
    b100 = rate("service B=100")
    row("B=100 vs graphile-worker batched", f"{fmt(b100, 0)} vs {fmt(peer('graphile-worker batched'), 0)}",
        ratio(b100, peer("graphile-worker batched")), "≥ 1.5", lambda v: v >= 1.5)
    row("B=100 vs pgbench generic drain, 4 clients", f"{fmt(b100, 0)} vs {fmt(generic('B100k c4'), 0)}",
        ratio(b100, generic("B100k c4")), "≥ 0.6", lambda v: v >= 0.6)
    own = max((rate(f"ceiling B=100 C={c}") or 0 for c in (4, 32)), default=0) or None
    row("B=100 vs its own statements' ceiling (best C)", f"{fmt(b100, 0)} vs {fmt(own, 0)}",
        ratio(b100, own), "≥ 0.6", lambda v: v >= 0.6)
    b1 = rate("service B=1")
    row("B=1 vs pgbench one row per transaction, 32 clients", f"{fmt(b1, 0)} vs {fmt(generic('A100k c32'), 0)}",
        ratio(b1, generic("A100k c32")), "≥ 2", lambda v: v >= 2)
    half = cells.get("sustained 50%")
    p99 = median(half, "claim_ms", "p99") if half else None
    row("ClaimInvoices p99 at 50% of the highest rate kept up with, ms", "sustained 50%", p99, "< 10", lambda v: v < 10)
    idle = cells.get("idle pickup")
    p50 = median(idle, "pickup_ms", "p50") if idle else None
    row("idle pickup p50, ms", "idle pickup", p50, "< 5", lambda v: v < 5)
    # Each drain beside the completed rows runs right after its empty-table
    # reference; runs from before the reference existed compare with B=100.
    empty = rate("scale reference: B=100, empty table") or b100
    row("burn-down beside the completed rows vs empty table", f"{fmt(rate('scale B=100 beside completed'), 0)} vs {fmt(empty, 0)}",
        ratio(rate("scale B=100 beside completed"), empty), "≥ 0.9", lambda v: v >= 0.9)
    peak = max((r.get("service", {}).get("peak_rss_mib", 0) for runs in cells.values() for r in runs), default=None)
    row("service peak RSS over every cell, MiB", "all cells", peak, "< 50", lambda v: v < 50)
    print()


def main():
    out = sys.argv[1]
    cells, peers, raw, discarded = load(out)
    machine = os.path.join(out, "machine.txt")
    if os.path.exists(machine):
        print("```\n" + open(machine).read().rstrip() + "\n```\n")
    if discarded:
        print("Service runs discarded because other processes disturbed them, and run again: "
              + ", ".join(f"{label} ×{n}" for label, n in discarded.items()) + ".\n")
    targets(cells, peers, raw)
    burn_downs(cells)
    pickups(cells)
    peer_tables(peers, raw)


if __name__ == "__main__":
    main()
