"""The merged sweep matrix as one static HTML file: no server, no external assets.

The table is plain HTML (readable without JavaScript); a small inline script shows a
configuration's non-pass checks and its repro command when its cell is clicked, or when
the page is opened with `#<engine>/<model>` (a link to one configuration).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from . import report as report_mod
from .sweep_merge import cell_text

COLOUR = {"pass": "#c8f0c8", "xfail": "#fff0a0", "skip": "#e4e4e4", "fail": "#ffb0b0", "error": "#ff7070"}

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em}
table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px;white-space:nowrap;text-align:left}
#layout{display:flex;gap:1em;align-items:flex-start}
td.cell{cursor:pointer;font-family:monospace}td.cell:hover{outline:2px solid #333}
""" + "".join(f"td.st-{k}{{background:{v}}}" for k, v in COLOUR.items()) + """
#detail{position:sticky;top:1em;padding:.5em;border:1px solid #333;min-height:2em;max-width:70em;
max-height:90vh;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere;font-family:monospace}
"""

_SCRIPT = """
const DATA = JSON.parse(document.getElementById('sweep-data').textContent);
function show(key) {
  const [engine, ...rest] = key.split('/');
  const model = rest.join('/');
  const cell = (DATA.cells[model] || {})[engine];
  const box = document.getElementById('detail');
  if (!cell) { box.textContent = 'no configuration ' + key; return; }
  const lines = [engine + ' ' + model + ': ' + cell.status + ' (-cpu ' + cell.cpu + ')'];
  if (cell.skip) lines.push('skip: ' + cell.skip);
  if (cell.retry) lines.push('retried as -cpu ' + cell.retry.cpu + ': ' + cell.retry.why);
  if (cell.deviations.length) lines.push('deviations: ' + cell.deviations.join(', '));
  for (const n of cell.nonpass) lines.push(n.status + ' ' + n.id + ': ' + n.reason);
  if (cell.repro) lines.push('reproduce: ' + cell.repro);
  lines.push('report: ' + cell.report);
  box.textContent = lines.join('\\n');
  box.dataset.shown = key;
}
document.querySelectorAll('td.cell').forEach(td => td.addEventListener('click', () => show(td.dataset.key)));
if (location.hash.length > 1) show(decodeURIComponent(location.hash.slice(1)));
"""


def page(merged: dict) -> str:
    e = html.escape
    engines = merged["engines"]
    rows = []
    for row in merged["rows"]:
        model = row["model"]
        tds = []
        for engine in engines:
            cell = merged["cells"][model].get(engine)
            if cell is None:
                tds.append("<td></td>")
                continue
            tds.append(f'<td class="cell st-{cell["status"]}" data-key="{e(engine)}/{e(model)}" '
                       f'title="{e(cell["skip"] or cell["status"])}">{e(cell_text(cell))}</td>')
        tweak = f' <small>({e(row["tweak"])})</small>' if row["tweak"] else ""
        rows.append(f'<tr class="model" data-model="{e(model)}"><th>{e(model)}{tweak}</th>{"".join(tds)}</tr>')
    s = merged["summary"]
    summary = " ".join(f"{k}={v}" for k, v in s["by_status"].items() if k != "xpass")
    devs = "".join(f"<li><b>{e(n)}</b> ({d['configs']} configurations): {e(d['reason'])}</li>"
                   for n, d in merged["deviations"].items())
    host = merged["hosts"][0] if merged["hosts"] else {}
    # JSON inside <script>: `</` would end the element early.
    data = json.dumps({"cells": merged["cells"]}).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ring-lab sweep</title><style>{_STYLE}</style></head>
<body>
<h1>ring-lab sweep</h1>
<p>QEMU {e(str(host.get("qemu", "?")))}, KVM module {e(str(host.get("kvm_module")))};
configurations={s["configs"]} {e(summary)}. Cells: ✓ pass, x xfail (known deviation), - skip, ✗ fail, ! error,
ʳ retried. Click a cell for its non-pass checks and repro command.</p>
<div id="layout"><table id="matrix"><thead><tr><th>model</th>{"".join(f"<th>{e(x)}</th>" for x in engines)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<div id="detail">click a cell</div></div>
<h2>Deviations seen</h2><ul>{devs or "<li>none</li>"}</ul>
<script type="application/json" id="sweep-data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_html(merged: dict, path: Path) -> None:
    report_mod._atomic_write(path, page(merged))
