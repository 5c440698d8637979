#!/usr/bin/env python3
"""Tests of bench/report.py's verdicts (stdlib only): a target passes only on what was measured.

Run: python3 -m unittest discover -s bench -p 'test_*.py'   (.ci/run does)
"""

import os
import sys
import unittest
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

CONCURRENCIES = [1, 2, 4, 16, 64]


def sync_rows(system, rate, concurrencies=CONCURRENCIES, reps=3):
    """Sync rows of `system` answering `rate` 2xx a second for 1 s at each concurrency."""
    rows = []
    for c in concurrencies:
        for rep in range(1, reps + 1):
            if system == "ceiling":
                rows.append({"kind": "ceiling", "system": system, "concurrency": c, "rep": rep,
                             "runs": rate, "failures": 0, "duration_s": 1.0, "p50_us": 1000.0,
                             "p99_us": 2000.0})
            else:
                rows.append({"kind": "load", "mode": "sync", "system": system, "concurrency": c,
                             "rep": rep, "statuses": {"200": rate}, "duration_s": 1.0,
                             "p50_us": 1010.0, "p99_us": 2000.0})
    return rows


def results(hookrunner_concurrencies=CONCURRENCIES, rss=None, startups=None):
    """A run where hookrunner is 0.95 x the ceiling, 1.4 x webhook and 1.9 x Apache: every target met."""
    rows = defaultdict(list)
    rows["ceiling"] = sync_rows("ceiling", 1000)
    rows["load"] = (sync_rows("hookrunner", 950, hookrunner_concurrencies)
                    + sync_rows("webhook", 678) + sync_rows("apache", 500))
    rows["rss"] = [rss if rss is not None else
                   {"kind": "rss", "system": "hookrunner", "concurrency": 16, "idle_rss_kib": 2600,
                    "peak_rss_kib": 3900, "hwm_kib": 3950, "load_statuses": {"200": 5000}}]
    rows["startup"] = startups if startups is not None else [
        {"kind": "startup", "system": "hookrunner", "ms": 1.6} for _ in range(10)]
    return report.Results({}, [], rows)


def set_rate(res, system, c, rate):
    """Makes every repetition of `system` at concurrency `c` answer `rate` 2xx a second."""
    res.sync[system][c] = {rep: dict(row, statuses={"200": rate})
                           for rep, row in res.sync[system][c].items()}


def verdicts(res):
    """{target label: (measured, verdict)} from the Targets table."""
    lines = report.targets(res).splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: (row[1], row[2]) for row in cells}


def verdict(res, prefix):
    matches = [v for label, v in verdicts(res).items() if label.startswith(prefix)]
    assert len(matches) == 1, (prefix, verdicts(res))
    return matches[0]


class Targets(unittest.TestCase):
    def test_a_run_that_meets_every_target_passes_them(self):
        res = results()
        for prefix in ["sync ≥ 0.90", "sync ≥ 1.3", "sync ≥ 1.8", "idle RSS", "peak RSS",
                       "start to ready"]:
            self.assertEqual(verdict(res, prefix)[1], "pass", prefix)
        self.assertIn("lowest 0.950×", verdict(res, "sync ≥ 0.90")[0])

    def test_a_concurrency_hookrunner_was_not_measured_at_fails_the_target(self):
        # As when hookrunner crashed after c=4: the points it did serve must not pass alone.
        res = results(hookrunner_concurrencies=[1, 2, 4])
        measured, mark = verdict(res, "sync ≥ 0.90")
        self.assertEqual(mark, "**FAIL**")
        self.assertIn("not measured at c=16, c=64", measured)
        self.assertEqual(verdict(res, "sync ≥ 1.3")[1], "**FAIL**")

    def test_a_ratio_just_under_the_target_is_shown_as_such(self):
        res = results()
        set_rate(res, "hookrunner", 64, 897)
        measured, mark = verdict(res, "sync ≥ 0.90")
        self.assertEqual(mark, "**FAIL**")
        self.assertIn("0.897× (c=64)", measured)

    def test_the_ceiling_bound_names_where_a_target_is_out_of_reach(self):
        res = results()
        # webhook at 0.85 x the ceiling at c=16: even the ceiling is only 1.18 x webhook there.
        set_rate(res, "webhook", 16, 850)
        measured, mark = verdict(res, "sync ≥ 1.3")
        self.assertEqual(mark, "**FAIL**")
        self.assertIn("out of reach even at the ceiling at c=16 (ceiling is 1.18×", measured)

    def test_memory_of_a_server_that_died_is_not_a_pass(self):
        dead = {"kind": "rss", "system": "hookrunner", "concurrency": 16, "idle_rss_kib": 0,
                "peak_rss_kib": 0, "hwm_kib": 0}
        res = results(rss=dead)
        self.assertEqual(verdict(res, "idle RSS"), ("not measured", "—"))
        self.assertEqual(verdict(res, "peak RSS")[1], "—")

    def test_a_peak_without_a_served_load_is_not_a_pass(self):
        unloaded = {"kind": "rss", "system": "hookrunner", "concurrency": 16,
                    "idle_rss_kib": 2600, "peak_rss_kib": 2700, "hwm_kib": 2700,
                    "load_statuses": {"503": 10}}
        res = results(rss=unloaded)
        self.assertEqual(verdict(res, "idle RSS")[1], "pass")
        self.assertEqual(verdict(res, "peak RSS"),
                         ("not measured (no load was served)", "—"))

    def test_the_peak_label_names_the_concurrency_used(self):
        other = {"kind": "rss", "system": "hookrunner", "concurrency": 32, "idle_rss_kib": 2600,
                 "peak_rss_kib": 3900, "hwm_kib": 3900, "load_statuses": {"200": 10}}
        self.assertEqual(verdict(results(rss=other), "peak RSS at c=32")[1], "pass")

    def test_failed_starts_fail_the_start_up_target(self):
        starts = [{"kind": "startup", "system": "hookrunner", "ms": 1.6}] + [
            {"kind": "startup", "system": "hookrunner", "error": "no 200"} for _ in range(9)]
        measured, mark = verdict(results(startups=starts), "start to ready")
        self.assertEqual(mark, "**FAIL**")
        self.assertIn("9 of 10 starts failed", measured)



class HistoryTargets(unittest.TestCase):
    def with_nohistory(self, rate, rss=None):
        res = results()
        for row in sync_rows("hookrunner-nohistory", rate):
            res.sync.setdefault("hookrunner-nohistory", {}).setdefault(row["concurrency"], {})[row["rep"]] = row
        if rss is not None:
            res.rows["rss"].append(rss)
        return res

    def test_the_history_passes_within_2_percent_of_no_history_at_every_concurrency(self):
        # hookrunner answers 950/s: 960/s without the history is 0.990 x, 975/s 0.974 x.
        label = "sync history ≥ 0.98 × without it"
        res = self.with_nohistory(960)
        self.assertEqual(verdicts(res)[label], ("lowest 0.990× (c=1)", "pass"))
        set_rate(res, "hookrunner-nohistory", 16, 975)
        self.assertEqual(verdicts(res)[label], ("lowest 0.974× (c=16)", "**FAIL**"))
        res = self.with_nohistory(960)
        del res.sync["hookrunner-nohistory"][64]
        measured, mark = verdicts(res)[label]
        self.assertEqual(mark, "**FAIL**")
        self.assertIn("not measured at c=64", measured)
        # The ceiling's own target stays beside it.
        self.assertEqual(verdict(res, "sync ≥ 0.90")[1], "pass")

    def test_the_history_table_gives_the_store_threads_share_of_the_machine(self):
        res = self.with_nohistory(960)
        for c in CONCURRENCIES:
            res.sync["hookrunner"][c] = {rep: dict(row, machine_cpu_ms=1900, store_cpu_ms=9.5)
                                         for rep, row in res.sync["hookrunner"][c].items()}
        # 950 runs: 2,000 µs of the machine and 10 µs of the store's threads per run.
        row = [line for line in report.section(res).splitlines() if line.startswith("| 16 |")
               and "0.990×" in line]
        self.assertEqual(len(row), 1, row)
        self.assertIn("10.0 µs, 0.50 %", row[0])
        del res.sync["hookrunner"][16][2]["store_cpu_ms"]
        del res.sync["hookrunner"][16][1]["store_cpu_ms"]
        del res.sync["hookrunner"][16][3]["store_cpu_ms"]
        row = [line for line in report.section(res).splitlines() if line.startswith("| 16 |")
               and "0.990×" in line]
        self.assertTrue(row[0].rstrip().endswith("| — |"), row)

    def test_no_history_row_without_a_run_without_it(self):
        self.assertFalse(any(label.startswith("sync history") for label in verdicts(results())))

    def test_each_idle_bound_is_checked_against_its_own_system(self):
        bare = {"kind": "rss", "system": "hookrunner-nohistory", "concurrency": 16,
                "idle_rss_kib": 4200, "peak_rss_kib": 5000, "hwm_kib": 5000,
                "load_statuses": {"200": 10}}
        res = self.with_nohistory(960, rss=bare)
        # hookrunner idles at 2.6 MiB with its store (results()): under 6 MiB; 4.1 MiB without is over 4.
        self.assertEqual(verdict(res, "idle RSS ≤ 6 MiB with the store open"), ("2.5 MiB", "pass"))
        self.assertEqual(verdict(res, "idle RSS ≤ 4 MiB without the store"),
                         ("4.1 MiB", "**FAIL**"))
        res.rows["rss"][0]["idle_rss_kib"] = 6200
        self.assertEqual(verdict(res, "idle RSS ≤ 6 MiB")[1], "**FAIL**")
        res.rows["rss"][1]["idle_rss_kib"] = 4000
        self.assertEqual(verdict(res, "idle RSS ≤ 4 MiB")[1], "pass")
        self.assertIn("| hookrunner without the history (history = false) | 3.9 MiB pass |",
                      report.section(res))
        res.rows["rss"][0]["idle_anon_kib"] = 700
        self.assertIn("| hookrunner | 6.1 MiB (anonymous 0.7 MiB) **FAIL** |", report.section(res))


class Logging(unittest.TestCase):
    def test_the_report_says_when_logging_was_turned_down(self):
        res = results()
        res.meta["rust_log"] = "warn"
        text = report.section(res)
        self.assertIn("logging turned down (`RUST_LOG=warn`, not the default info)", text)
        res.meta["rust_log"] = "info"
        text = report.section(res)
        self.assertNotIn("turned down", text)
        self.assertIn("default log level (`RUST_LOG=info`", text)


class TlsTargets(unittest.TestCase):
    def test_tls_variants_pass_only_at_every_concurrency_measured(self):
        res = results()
        for system, rate in (("hookrunner-tls", 920), ("hookrunner-tls-close", 820)):
            for row in sync_rows(system, rate):
                res.sync.setdefault(system, {}).setdefault(row["concurrency"], {})[row["rep"]] = row
        got = verdicts(res)
        keep = got["hookrunner TLS (keep-alive) ≥ 0.95 × plain"]
        close = got["hookrunner TLS (new connection per request) ≥ 0.85 × plain"]
        self.assertEqual(keep[1], "pass", keep)
        self.assertEqual(close[1], "pass", close)
        set_rate(res, "hookrunner-tls", 16, 850)
        del res.sync["hookrunner-tls-close"][64]
        got = verdicts(res)
        self.assertEqual(got["hookrunner TLS (keep-alive) ≥ 0.95 × plain"][1], "**FAIL**")
        close = got["hookrunner TLS (new connection per request) ≥ 0.85 × plain"]
        self.assertEqual(close[1], "**FAIL**", close)
        self.assertIn("not measured at c=64", close[0])

    def test_the_rustls_client_pair_is_judged_against_its_own_baseline(self):
        res = results()
        label = ("hookrunner TLS (new connection per request), rustls client ≥ 0.85 × plain with the "
                 "same client")
        self.assertNotIn(label, verdicts(res))
        # 700 / 950 (hookrunner under wrk) would fail; 700 / 800 (the same client's plain load) passes.
        for system, rate in (("hookrunner-rustls", 800), ("hookrunner-tls-close-rustls", 700)):
            for row in sync_rows(system, rate):
                res.sync.setdefault(system, {}).setdefault(row["concurrency"], {})[row["rep"]] = row
        self.assertEqual(verdicts(res)[label][1], "pass", verdicts(res)[label])
        set_rate(res, "hookrunner-tls-close-rustls", 2, 670)
        self.assertEqual(verdicts(res)[label][1], "**FAIL**", verdicts(res)[label])
        self.assertIn("TLS with a new connection per request, driven by a rustls client",
                      report.section(res))

    def test_no_tls_row_without_a_tls_run(self):
        self.assertFalse(any("TLS" in label for label in verdicts(results())))

    def test_the_hmac_variant_passes_within_2_percent_of_plain_only(self):
        res = results()
        for row in sync_rows("hookrunner-hmac", 935):
            res.sync.setdefault("hookrunner-hmac", {}).setdefault(row["concurrency"], {})[row["rep"]] = row
        label = "hookrunner behind a github sender (HMAC) ≥ 0.98 × plain"
        self.assertEqual(verdicts(res)[label][1], "pass", verdicts(res)[label])
        set_rate(res, "hookrunner-hmac", 4, 925)
        self.assertEqual(verdicts(res)[label][1], "**FAIL**")



def async_row(c, rep, raw_p99_us, wrk_p99_us=200000.0):
    """hookrunner async at concurrency c: 30,000 acks in 3 s, all run; latencies as given."""
    row = {"kind": "async", "system": "hookrunner", "concurrency": c, "rep": rep,
           "statuses": {"202": 30000}, "duration_s": 3.0, "ran": 30000, "settled": True,
           "settle_s": 40.0, "p50_us": 1000.0, "p99_us": wrk_p99_us, "max_us": 300000.0}
    if raw_p99_us is not None:
        row["raw"] = {"count": 30000, "mean_us": 1200.0, "p50_us": 900.0, "p90_us": 2000.0,
                      "p99_us": raw_p99_us, "max_us": 40000.0}
    return row


class AckLatency(unittest.TestCase):
    def with_async(self, *rows):
        res = results()
        res.rows["async"] = list(rows)
        return res

    def test_the_target_is_judged_on_each_requests_own_latency_not_wrks_corrected_one(self):
        res = self.with_async(*[async_row(c, rep, 6000.0) for c in (16, 64) for rep in (1, 2, 3)])
        self.assertEqual(verdict(res, "async ack p99 ≤ 10 ms at c=16"), ("6.00 ms", "pass"))
        self.assertEqual(verdict(res, "async ack p99 ≤ 10 ms at c=64"), ("6.00 ms", "pass"))

    def test_the_median_repetition_over_the_target_fails_it(self):
        res = self.with_async(*[async_row(16, rep, p99) for rep, p99 in ((1, 9000.0), (2, 11000.0),
                                                                          (3, 12000.0))])
        self.assertEqual(verdict(res, "async ack p99 ≤ 10 ms at c=16"), ("11.00 ms", "**FAIL**"))
        self.assertEqual(verdict(res, "async ack p99 ≤ 10 ms at c=64"), ("not measured", "—"))

    def test_a_run_without_the_raw_timing_does_not_pass_on_wrks_figures(self):
        res = self.with_async(async_row(16, 1, None, wrk_p99_us=1000.0))
        self.assertEqual(verdict(res, "async ack p99 ≤ 10 ms at c=16"), ("not measured", "—"))

    def test_the_async_table_shows_both_latencies(self):
        res = self.with_async(async_row(16, 1, 4500.0, wrk_p99_us=87000.0))
        text = report.section(res)
        self.assertIn("0.90 / 4.50 / 40.00", text)
        self.assertIn("87.00", text)

class Drained(unittest.TestCase):
    def with_async(self, *rows):
        res = results()
        res.rows["async"] = list(rows)
        res.meta["async_settle_s"] = "60"
        return res

    def test_a_queue_that_had_not_drained_is_not_reported_as_lost_nor_passed(self):
        short = dict(async_row(4, 1, 3000.0), ran=20000, settled=False)
        res = self.with_async(short)
        text = report.section(res)
        self.assertIn("had not run every acknowledged event when the harness stopped waiting "
                      "(BENCH_ASYNC_SETTLE = 60 s) at c = 4", text)
        self.assertNotIn("never ran", text)
        measured, mark = verdict(res, "async ≥ 3000")
        self.assertEqual(mark, "not shown")
        self.assertIn("not drained at c=4", measured)

    def test_a_drained_queue_that_ran_fewer_than_it_acknowledged_is_a_broken_promise(self):
        res = self.with_async(dict(async_row(16, 1, 3000.0), ran=29000))
        self.assertIn("hookrunner acknowledged events that never ran at c = 16**", report.section(res))
        self.assertEqual(verdict(res, "async ≥ 3000")[1], "**FAIL**")

    def test_webhooks_losses_are_explained_by_its_open_file_limit(self):
        dropped = dict(async_row(64, 1, 3000.0), system="webhook", ran=23000)
        res = self.with_async(async_row(64, 1, 3000.0), dropped)
        res.meta["webhook_open_files_limit"] = "1024"
        text = report.section(res)
        self.assertIn("adnanh/webhook acknowledged events that never ran at c = 64. It answers 200", text)
        self.assertIn("(here 1024)", text)
        self.assertNotIn("hookrunner acknowledged events that never ran", text)


class AckFloor(unittest.TestCase):
    def with_async(self, *rows):
        res = results()
        res.rows["async"] = list(rows)
        return res

    def test_the_floor_is_judged_at_c16_and_c64_and_the_rest_is_shown(self):
        one = dict(async_row(1, 1, 3000.0), statuses={"202": 6300}, ran=6300)
        res = self.with_async(one, async_row(16, 1, 3000.0), async_row(64, 1, 3000.0))
        measured, mark = verdict(res, "async ≥ 3000")
        self.assertEqual(mark, "pass", measured)
        self.assertIn("10,000/s at worst", measured)
        self.assertIn("not judged: c=1 2,100/s", measured)
        slow = dict(async_row(64, 1, 3000.0), statuses={"202": 8700}, ran=8700)
        res = self.with_async(one, async_row(16, 1, 3000.0), slow)
        measured, mark = verdict(res, "async ≥ 3000")
        self.assertEqual(mark, "**FAIL**", measured)
        self.assertIn("2,900/s at worst (c=64)", measured)

    def test_without_c16_and_c64_the_floor_is_not_measured(self):
        res = self.with_async(dict(async_row(4, 1, 3000.0)))
        measured, mark = verdict(res, "async ≥ 3000")
        self.assertEqual(mark, "—")
        self.assertIn("not measured at c=16 or c=64", measured)


if __name__ == "__main__":
    unittest.main()
