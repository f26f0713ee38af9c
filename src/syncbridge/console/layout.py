"""The frame every console page shares: one stylesheet, navigation, escaping helpers.

No scripts: every page is plain HTML and every action a form, so the console works with a
keyboard, a screen reader and a phone. Colours keep WCAG AA contrast (4.5:1 for text) and every
focusable element shows a visible focus ring.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from .auth import Action, User
from .csrf import hidden

__all__ = ["e", "page", "pill", "table", "notice"]

STYLE = """
*{box-sizing:border-box}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#fff}
a{color:#1d4ed8}a:hover{color:#1e3a8a}
:focus-visible{outline:3px solid #b45309;outline-offset:2px}
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:.5rem;background:#fff;padding:.3rem .6rem;z-index:2}
header{background:#1e293b;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;align-items:center}
header .brand{font-weight:700;margin-right:auto}
header nav{display:flex;flex-wrap:wrap;gap:.2rem .9rem}
header a{color:#fff;text-decoration:none;padding:.2rem .1rem;border-bottom:2px solid transparent}
header a[aria-current=page]{border-bottom-color:#fbbf24}
header a:focus-visible,header button:focus-visible{outline-color:#fbbf24}
header form{display:inline;margin:0}
header .who{font-size:.9rem;color:#e2e8f0}
main{max-width:72rem;margin:0 auto;padding:1rem}
h1{font-size:1.45rem;margin:.6rem 0}h2{font-size:1.1rem;margin-top:1.8rem;border-bottom:1px solid #cbd5e1;padding-bottom:.3rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.4rem .55rem;border-bottom:1px solid #e2e8f0;vertical-align:top}
th{font-weight:600;color:#334155;font-size:.85rem;text-transform:uppercase;letter-spacing:.03em}
.muted{color:#475569}.ok{color:#166534;font-weight:600}.bad{color:#991b1b;font-weight:600}
.pill{display:inline-block;padding:0 .5rem;border-radius:.7rem;margin:.1rem;font-size:.88rem;border:1px solid transparent}
.live{background:#dcfce7;color:#14532d}.removed{background:#e5e7eb;color:#1f2937}.pending{background:#fef3c7;color:#78350f}
.dead{background:#fee2e2;color:#7f1d1d}.none{background:#fff;color:#334155;border-color:#94a3b8}
.notice{padding:.6rem .8rem;border-radius:.4rem;margin:.8rem 0;border:1px solid}
.notice.info{background:#eff6ff;border-color:#93c5fd;color:#1e3a8a}.notice.error{background:#fef2f2;border-color:#fca5a5;color:#7f1d1d}
form.action{border:1px solid #cbd5e1;border-radius:.5rem;padding:.8rem 1rem;margin:1rem 0;max-width:36rem}
form.inline{display:inline;margin:0}
fieldset{border:1px solid #cbd5e1;border-radius:.4rem;margin:.6rem 0;padding:.4rem .8rem}
label{display:block;font-weight:600;margin:.6rem 0 .2rem}
label.check{display:flex;gap:.4rem;align-items:center;font-weight:400;margin:.3rem 0}
input[type=text],input[type=password],input[type=date],select,textarea{font:inherit;padding:.4rem .5rem;border:1px solid #64748b;border-radius:.3rem;width:100%;max-width:30rem;color:#1d2430;background:#fff}
textarea{min-height:4rem}
button{font:inherit;cursor:pointer;border-radius:.35rem;padding:.45rem .9rem;border:1px solid #1d4ed8;background:#1d4ed8;color:#fff;margin-top:.6rem}
button.secondary{background:#fff;color:#1d4ed8}button.danger{background:#b91c1c;border-color:#b91c1c}
header button{background:transparent;border-color:#cbd5e1;color:#fff;margin:0;padding:.15rem .6rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dl.facts dt{font-weight:600;color:#334155}dl.facts dd{margin:0}
.big{font-size:1.25rem;font-weight:700}
@media (max-width:40rem){main{padding:.6rem}th,td{padding:.35rem .3rem}header .brand{width:100%}dl.facts{grid-template-columns:1fr}}
"""

_NAV = (
    ("sessions", "/console/sessions", "Sessions", None),
    ("worklist", "/console/worklist", "Worklist", None),
    ("bulk", "/console/bulk", "Bulk operations", Action.BULK),
    ("status", "/console/status", "Status", None),
)


def e(value: Any) -> str:
    """Text escaped for HTML; None as nothing."""
    return html.escape("" if value is None else str(value))


def pill(text: str, kind: str) -> str:
    return f'<span class="pill {e(kind)}">{e(text)}</span>'


def notice(text: str, kind: str = "info") -> str:
    role = "alert" if kind == "error" else "status"
    return f'<div class="notice {e(kind)}" role="{role}">{e(text)}</div>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], empty: str, caption: str | None = None) -> str:
    """A table of cells already rendered as HTML; ``empty`` when there are no rows."""
    if not rows:
        return f'<p class="muted">{e(empty)}</p>'
    cap = f"<caption class=\"skip\">{e(caption)}</caption>" if caption else ""
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def page(title: str, body: str, *, practice: str, user: User | None, current: str = "", refresh: int | None = None) -> str:
    """A whole console page. ``refresh``: reload every so many seconds (a progress page, without scripts)."""
    nav = ""
    if user is not None:
        links = "".join(
            f'<a href="{href}"{" aria-current=page" if key == current else ""}>{e(label)}</a>'
            for key, href, label, needs in _NAV if needs is None or user.may(needs)
        )
        nav = (
            f'<nav aria-label="Console">{links}</nav><span class="who">{e(user.name)} ({e(user.role.value.replace("_", " "))})</span>'
            f'<form class="inline" method="post" action="/console/logout">{hidden(user)}<button type="submit">Log out</button></form>'
        )
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">{meta}
<title>{e(title)} · syncbridge: {e(practice)}</title><style>{STYLE}</style></head><body>
<a class="skip" href="#main">Skip to content</a>
<header><span class="brand">syncbridge · {e(practice)}</span>{nav}</header>
<main id="main"><h1>{e(title)}</h1>{body}</main></body></html>"""
