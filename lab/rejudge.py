"""`invoke lab.judge RUN_DIR|BOOT_DIR|serial.log`: judge a saved run again with today's rules.

What a boot observed is in its folder (serial.log, and gdb.readings.json where GDB read);
what the CPU model was is in the run's report.json (each run's `cpu_facts`: QEMU's QOM
answer, or Bochs' CPUID dump, taken before the boot), and the configuration the firmware ran
is its own `cmdline` record. Nothing boots: the plan (lab/expectations.py) and the judge
(lab/judge.py) run again over the same observations, so a rule or deviation changed since
shows in the verdicts, which are compared with the saved ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__, report
from .config import DEFAULT_SIGNATURE, BOCHS, ConfigError, check_only
from .expectations import Facts, with_smm
from .judge import Check, judge
from .records import parse_stream


@dataclass(frozen=True)
class _Saved:
    """What a saved boot's firmware ran with: read back from its `cmdline` record."""

    hv_signature: str
    host_mode: str
    kernel_args: tuple[str, ...]


def locate(path: str) -> tuple[Path, list[dict], dict]:
    """(run root, the run dicts to judge, the saved report) for a run folder, one of its boot
    folders or a boot's serial.log. Raises ConfigError (one line) for anything else."""
    if path == "":
        raise ConfigError("lab.judge '': name a run folder (runs/<time>), a boot folder in it or its serial.log")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"lab.judge {path}: does not exist")
    boot = None
    if p.is_file():
        if p.name != "serial.log":
            raise ConfigError(f"lab.judge {path}: not a serial.log, a boot folder or a run folder")
        boot, root = p.parent, p.parent.parent
    elif (p / "report.json").is_file():
        root = p
    elif (p / "serial.log").is_file():
        boot, root = p, p.parent
    else:
        raise ConfigError(f"lab.judge {path}: no report.json or serial.log in it (a run folder is runs/<time>)")
    saved_path = root / "report.json"
    if not saved_path.is_file():
        raise ConfigError(f"lab.judge {path}: {saved_path} is missing; it holds the CPU model's facts the rules need")
    try:
        saved = json.loads(saved_path.read_text())
        runs = saved["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"lab.judge {path}: {saved_path} is not a lab report ({exc})") from None
    if boot is not None:
        runs = [r for r in runs if Path(r.get("run_dir", "")).resolve() == boot.resolve()
                or Path(r.get("log", "")).resolve() == (boot / "serial.log").resolve()]
        if not runs:
            raise ConfigError(f"lab.judge {path}: {saved_path} has no run for {boot}")
    if not runs:
        raise ConfigError(f"lab.judge {path}: {saved_path} lists no boot")
    return root, runs, saved


def _saved_config(info: dict[str, str]) -> _Saved:
    words = info.get("cmdline", "").split()
    kv = dict(w.split("=", 1) for w in words if "=" in w)
    return _Saved(kv.get("hv-signature", DEFAULT_SIGNATURE), kv.get("host-mode", "auto"),
                  tuple(w for w in words if not w.startswith(("hv-signature=", "host-mode="))))


def _facts(run: dict, host: dict, saved: _Saved) -> Facts:
    """The facts of the machine the run was made on (its report's `host`), not this one's."""
    if run["accel"] == BOCHS:
        from .bochs import facts_for

        return facts_for(saved, run.get("cpu_facts") or {})
    kvm_module = host.get("kvm_module")
    facts = Facts.from_qemu(run["accel"], kvm_module if run["accel"] == "kvm" else None, run.get("cpu_facts") or {},
                            hv_signature=saved.hv_signature, host_mode=saved.host_mode,
                            guest_rdtsc_intercept="hv-intercept-rdtsc=0" not in saved.kernel_args,
                            host_cpuid_fault=bool(host.get("host_cpuid_fault", True)))
    return with_smm(facts, run.get("machine", ""), saved.kernel_args, bool(host.get("kvm_smm", False)))


def _readings(boot_dir: Path) -> dict | None:
    """GDB's readings of the boot, as the witness wrote them (None: GDB did not read)."""
    try:
        data = json.loads((boot_dir / "gdb.readings.json").read_text())
    except (OSError, ValueError):
        return None
    from .witness import Reading

    return {r["check_id"]: Reading(r["check_id"], r["value"], r.get("detail") or {}) for r in data.get("readings", [])}


def rejudge_run(run: dict, saved_report: dict) -> list[Check]:
    """One saved boot's checks under today's rules."""
    boot_dir = Path(run.get("run_dir") or Path(run["log"]).parent)
    try:
        serial = (boot_dir / "serial.log").read_bytes()
    except OSError as exc:
        raise ConfigError(f"lab.judge: {boot_dir / 'serial.log'}: {exc.strerror}") from None
    transcript = parse_stream(serial)
    saved = _saved_config(transcript.info)
    facts = _facts(run, saved_report.get("host", {}), saved)
    witness = saved_report.get("witness", "both")
    readings = _readings(boot_dir) if witness != "serial" else None
    return judge(facts, transcript, gdb_readings=readings, witness=witness if readings is not None else "serial",
                 config=run["config"], boot_exit=run.get("exit") or "error", boot_detail=run.get("exit_detail") or "")


def rejudge(path: str, only: str | None = None) -> tuple[dict, dict]:
    """(today's report, the saved one) for a saved run. `only`: as lab.run's --only (default:
    what the saved run asked, if it asked for some only)."""
    words = check_only(only) if only is not None else tuple(saved_only(path))
    _, runs, saved = locate(path)
    checks: list[Check] = []
    for run in runs:
        got = rejudge_run(run, saved)
        if words:
            from .cli import kept_by_only

            got = [c for c in got if kept_by_only(c, words)]
        checks += got
    rep = report.build(__version__, saved.get("host", {}), runs, checks, saved.get("witness", "both"))
    if words:
        rep["only"] = list(words)
    rep["rejudged"] = {"from": str(locate(path)[0] / "report.json"), "lab_version": saved.get("lab_version")}
    return rep, saved


def saved_only(path: str) -> list[str]:
    return list(locate(path)[2].get("only") or [])


def changes(new: dict, old: dict) -> list[tuple[str, str, str | None, str]]:
    """(config, check id, saved status or None when new, today's status) where they differ,
    and checks the saved run had that today's rules do not plan (status "absent")."""
    before = {(c["config"], c["id"]): c["status"] for c in old.get("checks", [])}
    configs = {r["config"] for r in new["runs"]}
    now = {(c["config"], c["id"]): c["status"] for c in new["checks"]}
    out = [(cfg, cid, before.get((cfg, cid)), st) for (cfg, cid), st in now.items() if before.get((cfg, cid)) != st]
    out += [(cfg, cid, st, "absent") for (cfg, cid), st in before.items() if cfg in configs and (cfg, cid) not in now]
    return out


def judge_main(path: str, console, *, only: str | None = None, json_path: str | None = None,
               markdown: str | None = None, view: str = "auto") -> int:
    """Re-judge, print the table and what changed; exit 1 on any fail or error, as lab.run."""
    from . import console as console_mod

    if view not in console_mod.VIEWS:
        raise ConfigError(f"--view {view!r}: choose one of {', '.join(console_mod.VIEWS)}")
    targets = [(flag, p) for flag, p in (("--json", json_path), ("--markdown", markdown)) if p is not None]
    for flag, p in targets:
        if p == "":
            raise ConfigError(f"{flag} '': name a file")
        report.check_target(p, flag)
    if len(targets) == 2 and Path(json_path).expanduser().resolve() == Path(markdown).expanduser().resolve():
        raise ConfigError(f"--json and --markdown name the same file {json_path}: give each its own")
    rep, saved = rejudge(path, only)
    if json_path:
        report.write_json(rep, report.check_target(json_path, "--json"))
    if markdown:
        report.write_markdown(rep, report.check_target(markdown, "--markdown"))
    console_mod.render(rep, console, view=view)
    diff = changes(rep, saved)
    console_mod.out(console, f"re-judged {rep['rejudged']['from']} (saved by lab {saved.get('lab_version')}) with "
                             f"today's rules (lab {__version__}): "
                             + (f"{len(diff)} verdict{'s' if len(diff) != 1 else ''} changed" if diff
                                else "no verdict changed"), highlight=False)
    for cfg, cid, before, now in diff[:20]:
        console_mod.out(console, f"  {cfg} {cid}: {before or 'not planned'} -> {now}", highlight=False)
    if len(diff) > 20:
        console_mod.out(console, f"  ... and {len(diff) - 20} more (the JSON has them all: --json)", highlight=False)
    s = rep["summary"]
    return 1 if s["fail"] or s["error"] else 0
