"""The merged sweep matrix as one static HTML file: no server, no external assets.

The table is plain HTML (readable without JavaScript), each cell coloured by its worst
status, with a legend; a blank cell (an engine the sweep did not run on that model) says
why on hover and in a note. A small inline script shows a configuration when its cell is
clicked, or when the page is opened with `#<engine>/<model>` (a link to one configuration;
a click updates it): the CPUID values its kernel and guest saw, its non-pass checks with the
skips grouped by reason, and its repro command; the selected cell is outlined.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from . import report as report_mod
from .sweep_merge import cell_text

COLOUR = {"pass": "#c8f0c8", "xfail": "#fff0a0", "skip": "#e4e4e4", "fail": "#ffb0b0", "error": "#ff7070"}
MEANING = {"pass": "every check passed", "xfail": "nothing failed; a named deviation showed",
           "skip": "not run: the reason in its detail", "fail": "a check failed", "error": "a check or the boot erred"}
BLANK_WHY = "a tweak row runs on the engine its tweak is for; --accel names the engines"

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em}
table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px;white-space:nowrap;text-align:left}
#layout{display:flex;gap:1em;align-items:flex-start}
td.cell{cursor:pointer;font-family:monospace}td.cell:hover{outline:2px solid #333}
td.selected{outline:3px solid #0040ff;outline-offset:-3px}td.blank{background:repeating-linear-gradient(45deg,#fff,#fff 4px,#eee 4px,#eee 8px)}
.swatch{display:inline-block;padding:0 .5em;margin-right:.3em;border:1px solid #999;font-family:monospace}
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
  if (cell.timeout_retry) lines.push('retried after a timeout (' + cell.timeout_retry.why + ') with ' +
    cell.timeout_retry.retry_timeout_s + ' s instead of ' + cell.timeout_retry.timeout_s + ' s');
  const values = Object.entries(cell.values || {});
  if (values.length) lines.push('CPUID seen: ' + values.map(([k, v]) => k + '=' + v).join('  '));
  if (cell.deviations.length) lines.push('deviations: ' + cell.deviations.join(', '));
  const skips = new Map();  // reason -> check ids: one line per reason
  for (const n of cell.nonpass) {
    if (n.status === 'skip') { if (!skips.has(n.reason)) skips.set(n.reason, []); skips.get(n.reason).push(n.id); }
    else lines.push(n.status + ' ' + n.id + ': ' + n.reason);
  }
  for (const [reason, ids] of skips) lines.push('skip x' + ids.length + ' (e.g. ' + ids[0] + '): ' + reason);
  if (cell.repro) lines.push('reproduce: ' + cell.repro);
  lines.push('report: ' + cell.report);
  box.textContent = lines.join('\\n');
  box.dataset.shown = key;
}
function select(key) {
  document.querySelectorAll('td.selected').forEach(td => td.classList.remove('selected'));
  document.querySelectorAll('td.cell').forEach(td => { if (td.dataset.key === key) td.classList.add('selected'); });
  show(key);
}
document.querySelectorAll('td.cell').forEach(td => td.addEventListener('click', () => {
  history.replaceState(null, '', '#' + encodeURIComponent(td.dataset.key).replace(/%2F/g, '/'));
  select(td.dataset.key);
}));
window.addEventListener('hashchange', () => select(decodeURIComponent(location.hash.slice(1))));
if (location.hash.length > 1) select(decodeURIComponent(location.hash.slice(1)));
"""


def page(merged: dict) -> str:
    e = html.escape
    engines = merged["engines"]
    rows = []
    blanks = 0
    for row in merged["rows"]:
        model = row["model"]
        tds = []
        for engine in engines:
            cell = merged["cells"][model].get(engine)
            if cell is None:
                blanks += 1
                tds.append(f'<td class="blank" title="{e(engine)} did not run {e(model)} in this sweep '
                           f'({e(BLANK_WHY)})"></td>')
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
    legend = ", ".join(f'<span class="swatch" style="background:{COLOUR[k]}">{k}</span>{e(MEANING[k])}' for k in COLOUR)
    blank_note = (f'<p id="blank-note">{blanks} blank cell{"s" if blanks != 1 else ""} (striped): that engine did '
                  f"not run that model in this sweep ({e(BLANK_WHY)}).</p>" if blanks else "")
    done = merged.get("completeness") or {}
    if done.get("partial"):
        blank_note += (f'<p id="partial" style="color:#b00000"><b>partial sweep</b>: {done["reported"]} of '
                       f'{done["planned"]} planned configurations reported; missing: {e(", ".join(done["missing"]))}</p>')
    # JSON inside <script>: `</` would end the element early.
    data = json.dumps({"cells": merged["cells"]}).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ring-lab sweep</title><style>{_STYLE}</style></head>
<body>
<h1>ring-lab sweep</h1>
<p>QEMU {e(str(host.get("qemu", "?")))}, KVM module {e(str(host.get("kvm_module")))};
configurations={s["configs"]} {e(summary)}.</p>
<p id="legend">A cell's colour is its worst status: {legend}. Its text counts checks: ✓ pass, ~ xfail
(a named deviation), X xpass, - skip, ✗ fail, ! error; ʳ retried. Click a cell (or open <code>#engine/model</code>)
for the CPUID values it saw, its non-pass checks (skips grouped by reason) and its repro command.</p>
{blank_note}
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
