"""report.md, report.html (self-contained: figures embedded as base64 PNG) and one PNG per study."""

from __future__ import annotations

import base64
import html
import platform
from pathlib import Path

from .studies import NOT_IN_SCOPE, Analysis


def _md_table(rows):
    if not rows:
        return ""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows):
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def verdict_lines(a: Analysis) -> list[str]:
    lines = [f"[{a.study}] {a.status.upper()}: {a.claim}"]
    for c in a.checks:
        lines.append(f"    - {c.status}: {c.claim}; {c.detail}")
    if not a.checks:
        lines.append("    - no check could be computed from the recorded results")
    return lines


def write(out: Path, sections: list[tuple], meta: dict) -> tuple[Path, Path]:
    """``sections``: (study, analysis, png path or None, n_runs). Returns (md path, html path)."""
    md = ["# normlab study report", ""]
    md.append(f"profile `{meta['profile']}`, device `{meta['device']}`, {meta['jobs']} process(es); "
              f"{meta['runs']} runs ({meta['new_runs']} run now, {meta['runs'] - meta['new_runs']} resumed from results.jsonl); "
              f"wall time of this invocation {meta['wall_s']:.0f} s; python {platform.python_version()}, torch {meta['torch']}; "
              f"{meta['cpu']}.")
    md.append("")
    md.append("Each verdict compares arms seed by seed: mean difference and its 95% interval (Student's t over "
              "seeds). *supported* = the whole interval shows the predicted effect of more than 1 point; "
              "*not supported* = the whole interval lies below that (no effect, a negligible one, or the reverse); "
              "*inconclusive* = the interval contains it. Tables: mean ± 95% half-width over seeds, in %.")
    md.append("")
    md.append("## Summary")
    md.append("")
    for study, a, _, _ in sections:
        md.append(f"- **{study}**: {a.status} — {a.claim}")
    md.append("")
    hs = ["<!doctype html><html><head><meta charset='utf-8'><title>normlab study report</title><style>",
          "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}",
          "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}",
          "th{background:#f3f3f3}.supported{color:#17692c}.not-supported,.partly-not-supported{color:#a11}.inconclusive,.mixed{color:#8a6d00}",
          "img{max-width:100%}</style></head><body>", "<h1>normlab study report</h1>",
          f"<p>{html.escape(md[2])}</p>", f"<p>{html.escape(md[4])}</p>", "<h2>Summary</h2><ul>"]
    for study, a, _, _ in sections:
        hs.append(f"<li><b>{html.escape(study)}</b>: <span class='{a.status.replace(' ', '-')}'>{html.escape(a.status)}</span> — "
                  f"{html.escape(a.claim)}</li>")
    hs.append("</ul>")
    for study, a, png, n in sections:
        md += [f"## {study}", "", f"**Claim.** {a.claim}", "", f"**Verdict: {a.status}** ({n} runs)", ""]
        hs += [f"<h2>{html.escape(study)}</h2>", f"<p><b>Claim.</b> {html.escape(a.claim)}</p>",
               f"<p><b>Verdict: <span class='{a.status.replace(' ', '-')}'>{html.escape(a.status)}</span></b> ({n} runs)</p><ul>"]
        for c in a.checks:
            md.append(f"- *{c.status}*: {c.claim} — {c.detail}")
            hs.append(f"<li><span class='{c.status.replace(' ', '-')}'>{html.escape(c.status)}</span>: {html.escape(c.claim)} — "
                      f"{html.escape(c.detail)}</li>")
        hs.append("</ul>")
        md += ["", _md_table(a.table), ""]
        hs.append(_html_table(a.table))
        if png is not None and Path(png).exists():
            md += [f"![{study}]({Path(png).name})", ""]
            b64 = base64.b64encode(Path(png).read_bytes()).decode()
            hs.append(f"<p><img alt='{html.escape(study)}' src='data:image/png;base64,{b64}'></p>")
        for note in a.notes:
            md.append(f"- note: {note}")
            hs.append(f"<p><i>note:</i> {html.escape(note)}</p>")
        md.append("")
    notes = list(meta.get("notes", [])) + [f"{k}: {v}" for k, v in NOT_IN_SCOPE.items()]
    if notes:
        md += ["## Notes", ""]
        hs.append("<h2>Notes</h2><ul>")
        for note in notes:
            md.append(f"- {note}")
            hs.append(f"<li>{html.escape(note)}</li>")
        hs.append("</ul>")
    hs.append("</body></html>")
    mdp, htp = out / "report.md", out / "report.html"
    mdp.write_text("\n".join(md) + "\n")
    htp.write_text("\n".join(hs) + "\n")
    return mdp, htp
