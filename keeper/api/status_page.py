"""``GET /status``: the status page, one server-side HTML document with its CSS and inline SVG
charts (nothing fetched from anywhere: it works on a host with no internet). No openid or
token is on it: counts, apps, dates and sweeps only."""

from __future__ import annotations

from datetime import datetime
from html import escape

from keeper import __version__
from keeper.api.charts import Bar, bar_chart, meter
from keeper.core.forecast import CHINA
from keeper.core.models import ACTIVE, EXPIRING, REAUTH
from keeper.observe.report import Report

#: ``keeper status`` counts shown at the top, in this order (each ``data-key`` is its name).
STATUS_KEYS = ("grants", "active", "reauth_required", "refresh_due_24h", "access_expired",
               "retrying", "profiles_failing", "avatars_saved")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:#f5f6f8;color:#1d2329}
header{background:#1d2329;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:18px}
header h1{font-size:20px;margin:0}header .meta{color:#b8c0c8;font-size:13px}
main{padding:18px 28px;max-width:1000px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:14px 18px;
margin-bottom:16px}
h2{font-size:16px;margin:0 0 10px}p.note{color:#5b6670;margin:4px 0 10px;font-size:13px}
.stats{display:grid;grid-template-columns:repeat(4,1fr);gap:10px}
.stat{border:1px solid #e4e7eb;border-radius:5px;padding:8px 12px}
.stat .n{display:block;font-size:22px;font-weight:600}.stat.alert .n{color:#c0392b}
.stat .k{color:#5b6670;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:right;padding:4px 8px;border-bottom:1px solid #edf0f2}
th:first-child,td:first-child{text-align:left}th{color:#5b6670;font-weight:600}
.chart .grid{stroke:#e4e7eb}.chart .axis{fill:#5b6670;font-size:11px}
.chart .bar{fill:#8fb8de}.chart .bar-part{fill:#c0392b}.chart .bar.alert{fill:#e67e22}
#sweep-chart .bar{fill:#6c9a5b}#sweep-chart .bar.alert{fill:#e67e22}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.meter-back{fill:#edf0f2}.meter-fill{fill:#4a90c2}.meter-fill.alert{fill:#c0392b}
.scroll{max-height:320px;overflow-y:auto}
"""


def _cst(value: datetime | None) -> str:
    return value.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _stats(report: Report) -> str:
    cells = "".join(
        f'<div class="stat" data-key="{k}"><span class="n">{report.status[k]:,}</span>'
        f'<span class="k">{k.replace("_", " ")}</span></div>' for k in STATUS_KEYS)
    last = report.status.get("last_sweep")
    when = (f"the last sweep finished {_cst(datetime.fromisoformat(last['finished_at']))} "
            "China time" if last else "no sweep has finished yet")
    return (f'<section id="summary"><h2>Now</h2><p class="note">The counts of '
            f"<code>keeper status</code>; {when}.</p><div class=\"stats\">{cells}</div>"
            "</section>")


def _grants(report: Report) -> str:
    apps = sorted({a for a, _ in report.grants})
    rows = []
    for app in apps:
        n = [report.grants.get((app, s), 0) for s in (ACTIVE, EXPIRING, REAUTH)]
        rows.append(f'<tr data-app="{escape(app)}"><td>{escape(app)}</td>'
                    + "".join(f"<td>{v:,}</td>" for v in n) + f"<td>{sum(n):,}</td></tr>")
    reasons = "".join(f'<tr data-reason="{escape(r)}"><td>{escape(r)}</td><td>{n:,}</td></tr>'
                      for r, n in sorted(report.status["reauth_by_reason"].items()))
    return ('<section id="grants"><h2>Grants by state</h2><p class="note">active: kept alive; '
            "expiring: WeChat returned the same refresh token on its refresh day, so it lapses "
            "at its end; reauth: the user must log in again.</p><table><tr><th>app</th>"
            "<th>active</th><th>expiring</th><th>reauth</th><th>total</th></tr>"
            + ("".join(rows) or '<tr><td colspan="5">no grants</td></tr>') + "</table>"
            + ('<h2 style="margin-top:14px">Re-authorization records by reason</h2><table>'
               f"<tr><th>reason</th><th>users</th></tr>{reasons}</table>" if reasons else "")
            + "</section>")


def _forecast(report: Report) -> str:
    bars = [Bar(d.date.strftime("%m-%d"), d.lapsing, d.expiring,
                f"{d.date.isoformat()}: {d.lapsing:,} lapsing ({d.expiring:,} already not "
                "renewed by WeChat)",
                {"date": d.date.isoformat(), "lapsing": str(d.lapsing),
                 "expiring": str(d.expiring)}) for d in report.forecast]
    total = sum(d.lapsing for d in report.forecast)
    certain = sum(d.expiring for d in report.forecast)
    return (f'<section id="forecast"><h2>Users lapsing in the next {len(bars)} days unless '
            f'they log in again</h2><p class="note">Live grants by the day (China time) '
            f'their refresh token\'s lifetime ends: <b id="forecast-total">{total:,}</b> in '
            f"all, <b>{certain:,}</b> of them already not renewed by WeChat (dark). keeper "
            "refreshes the others on their refresh day; WeChat may renew them then.</p>"
            + bar_chart(bars, chart_id="forecast-chart", caption="users lapsing per day")
            + '<p class="legend"><span style="background:#8fb8de"></span>lapsing unless '
            'renewed<span style="background:#c0392b"></span>not renewed by WeChat</p>'
            "</section>")


def _sweeps(report: Report) -> str:
    oldest_first = list(reversed(report.sweeps))
    bars = [Bar(_cst(s.started_at)[11:16], s.seconds or 0.0, 0.0,
                f"sweep {s.id} at {_cst(s.started_at)}: "
                f"{'unfinished' if s.seconds is None else f'{s.seconds:g} s'}, "
                f"{s.refreshed:,} refreshed, {s.failures:,} failures",
                {"sweep": str(s.id), "refreshed": str(s.refreshed),
                 "failures": str(s.failures)}, alert=s.failures > 0) for s in oldest_first]
    rows = "".join(
        f'<tr data-sweep="{s.id}"><td>{_cst(s.started_at)}</td><td>{escape(s.host)}</td>'
        f"<td>{'running' if s.finished_at is None else f'{s.seconds or 0:.2f}'}</td>"
        f"<td>{s.refreshed:,}</td><td>{s.failures:,}</td><td>{s.reauth_recorded:,}</td></tr>"
        for s in report.sweeps)
    return (f'<section id="sweeps"><h2>The last {len(bars)} sweeps</h2><p class="note">'
            "Duration in seconds, oldest on the left; orange: a sweep with transient "
            "failures. Times are China time.</p>"
            + (bar_chart(bars, chart_id="sweep-chart", caption="sweep duration", unit=" s",
                         height=180) if bars else "<p>No sweep has run yet.</p>")
            + '<div class="scroll"><table><tr><th>started</th><th>host</th><th>seconds</th>'
            f"<th>refreshed</th><th>failures</th><th>re-authorizations</th></tr>{rows}"
            "</table></div></section>")


def _quota(report: Report) -> str:
    rows = "".join(
        f'<tr data-app="{escape(q.appid)}" data-endpoint="{escape(q.endpoint)}">'
        f"<td>{escape(q.appid)}</td><td>{escape(q.endpoint)}</td>"
        f"<td>{q.used:,} of {q.limit:,} per {q.period_s:g} s</td>"
        f"<td>{meter(q.used / q.limit if q.limit else 0)}</td><td>{q.previous:,}</td></tr>"
        for q in report.quota)
    return ('<section id="quota"><h2>Quota used</h2><p class="note">Permits taken by all '
            "keeper processes in the current quota window (calendar windows, as WeChat "
            "counts), per app and endpoint.</p><table><tr><th>app</th><th>endpoint</th>"
            "<th>this window</th><th></th><th>previous window</th></tr>"
            + (rows or '<tr><td colspan="5">no quota configured</td></tr>')
            + "</table></section>")


def _events(report: Report) -> str:
    pending, failed = report.status["events_pending"], report.status["events_failed"]
    return ('<section id="events"><h2>Events</h2><p class="note">Deliveries to the '
            f"{report.webhooks} configured webhook(s): waiting for their first attempt or a "
            "retry, and given up after retrying (<code>keeper events --failed</code>; "
            '<code>keeper events replay --failed</code>).</p><div class="stats">'
            f'<div class="stat" data-key="events_pending"><span class="n">{pending:,}</span>'
            '<span class="k">events pending</span></div>'
            f'<div class="stat{" alert" if failed else ""}" data-key="events_failed">'
            f'<span class="n">{failed:,}</span><span class="k">events failed</span></div>'
            "</div></section>")


def render(report: Report) -> str:
    """The whole page."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>keeper status</title><style>{CSS}</style></head><body>"
        f'<header><h1>keeper status</h1><span class="meta">read {_cst(report.now)} China '
        f"time ({escape(report.now.isoformat(timespec='seconds'))}) · keeper "
        f"{escape(__version__)}</span></header><main>"
        + _stats(report) + _forecast(report) + _grants(report) + _sweeps(report)
        + _quota(report) + _events(report) + "</main></body></html>"
    )
