"""Inline SVG bar charts for the status page: drawn on the server, no script, no font or
library fetched from anywhere (the page must work on a host with no internet)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape


@dataclass(frozen=True)
class Bar:
    """One bar: its x-axis ``label``, its ``value``, the part of it drawn darker (``part``,
    e.g. the users WeChat already declined to renew), a tooltip, and ``data-*`` attributes
    (what a test or a script reads back)."""

    label: str
    value: float
    part: float = 0.0
    title: str = ""
    data: dict[str, str] = field(default_factory=dict)
    alert: bool = False  # drawn in the alert colour (a sweep with failures)


def nice_max(value: float) -> float:
    """The axis's top: 1, 2 or 5 times a power of ten, at least ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def bar_chart(bars: list[Bar], *, chart_id: str, caption: str, unit: str = "",
              width: int = 920, height: int = 240) -> str:
    """An SVG bar chart of ``bars`` (left to right) with a y axis of three gridlines and
    every few x labels; one ``rect.bar`` per bar, zeros included."""
    left, right, top, bottom = 56, 8, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = nice_max(max((b.value for b in bars), default=0))
    slot = plot_w / max(1, len(bars))
    bar_w = max(1.0, slot * 0.78)
    every = max(1, math.ceil(len(bars) / 10))
    out = [f'<svg id="{escape(chart_id)}" class="chart" role="img" viewBox="0 0 {width} '
           f'{height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{escape(caption)}</title>"]
    for i in range(3):
        v = top_value * i / 2
        y = top + plot_h - plot_h * i / 2
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{escape(_number(v))}{escape(unit)}</text>")
    for i, b in enumerate(bars):
        x = left + i * slot + (slot - bar_w) / 2
        h = plot_h * b.value / top_value
        data = "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in b.data.items())
        cls = "bar alert" if b.alert else "bar"
        out.append(f'<g><title>{escape(b.title or f"{b.label}: {_number(b.value)}")}</title>'
                   f'<rect class="{cls}" x="{x:.1f}" y="{top + plot_h - h:.1f}" '
                   f'width="{bar_w:.1f}" height="{h:.1f}"{data}/>')
        if b.part > 0:
            ph = plot_h * min(b.part, b.value) / top_value
            out.append(f'<rect class="bar-part" x="{x:.1f}" y="{top + plot_h - ph:.1f}" '
                       f'width="{bar_w:.1f}" height="{ph:.1f}"/>')
        out.append("</g>")
        if i % every == 0:
            out.append(f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{height - bottom + 16}" '
                       f'text-anchor="middle">{escape(b.label)}</text>')
    out.append("</svg>")
    return "".join(out)


def meter(fraction: float, *, width: int = 160, height: int = 12) -> str:
    """A small horizontal gauge (quota used), red from 90 %."""
    f = min(1.0, max(0.0, fraction))
    cls = "meter-fill alert" if f >= 0.9 else "meter-fill"
    return (f'<svg class="meter" width="{width}" height="{height}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{f:.0%}</title>'
            f'<rect class="meter-back" width="{width}" height="{height}" rx="3"/>'
            f'<rect class="{cls}" width="{width * f:.1f}" height="{height}" rx="3"/></svg>')
