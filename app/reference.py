"""The reference pack in the dashboard: read-only runs beside the user's store, labelled "reference".

Pages call `source(runs)` to learn whether they show the user's runs or the pack's (when the user has none),
and draw `caption(pack)` wherever pack runs appear. `ablation_points` and `reproduce` serve the Ablation
page: the pack's sweep points for a field, and a live run of any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferd import events as ev
from ferd.config import Config, from_dict
from ferd.experiments import run_record
from ferd.pack import Pack, PackError, open_pack
from ferd.store import RunInfo

PACK_DIR = Path(__file__).resolve().parent.parent / "assets" / "reference"


@dataclass(frozen=True)
class Source:
    """Where a page's runs come from: the user's store or the reference pack."""

    runs: list[RunInfo]
    events: Callable[[str], list[ev.Event]]
    pack: Pack | None
    """The pack when the runs are the pack's, else None."""


def load(root: Path = PACK_DIR) -> Pack | None:
    """The pack at `root`, None when there is none (or it cannot be read)."""
    try:
        return open_pack(root)
    except PackError:
        return None


def pack_events(pack: Pack, run_id: str) -> list[ev.Event]:
    return [e for _, e in pack.store.events(run_id)]


def source(user_runs: Sequence[RunInfo], user_events: Callable[[str], list[ev.Event]],
           pack: Pack | None) -> Source:
    """The user's runs when there are any, else the pack's (when there is a pack)."""
    if user_runs or pack is None:
        return Source(runs=list(user_runs), events=user_events, pack=None)
    return Source(runs=pack.store.list_runs(status="finished"), events=lambda i: pack_events(pack, i), pack=pack)


def caption(pack: Pack) -> str:
    """One line naming the pack's origin, and a warning when the engine changed since it was built."""
    m = pack.manifest
    text = (f"**reference** results (read-only), built by `{m.get('command', '?')}` at commit "
            f"`{str(m.get('commit', '?'))[:12]}` on {m.get('machine', '?')}, {m.get('date', '?')}.")
    if pack.stale:
        text += (f" The engine has changed since (pack engine version {m.get('engine_version', '?')}): "
                 "rebuild it with `python -m ferd pack` to match.")
    return text


def ablation_points(pack: Pack, param: str) -> list[dict[str, Any]]:
    """Run records of the pack's sweep over `param` (role == param), plus its seed-0 FERD run (which has the
    preset's value), sorted by the value; [] when the pack has no sweep over `param`."""
    entries = [r for r in pack.manifest.get("runs", []) if r["role"] == param]
    if not entries:
        return []
    sweep_seed = entries[0]["config"]["seed"]
    entries += [r for r in pack.manifest["runs"] if r["role"] == "compare" and r["config"]["method"] == "ferd"
                and r["config"]["seed"] == sweep_seed]
    records = [run_record(pack_events(pack, r["run_id"]), run_id=r["run_id"]) for r in entries]
    return sorted(records, key=lambda rec: rec["config"][param])


def reproduce(record: dict[str, Any]) -> Config:
    """The config that reruns a pack point live (the registry takes it as any other run)."""
    return from_dict(record["config"])


def ablation_panel(pack: Pack, param: str, submit: Callable[[Config, str], str]) -> None:
    """The pack's sweep over `param`: its figure, a slider over its points (each answered at once from the
    pack) and "Reproduce live" for the chosen point (`submit(config, name)` queues it). Nothing when the pack
    has no sweep over `param`."""
    import streamlit as st

    from app.analysis import ablation_figure
    from ferd.experiments import ablation_table

    records = ablation_points(pack, param)
    if not records:
        return
    st.subheader(f"Reference pack: {param}")
    st.caption(caption(pack))
    st.plotly_chart(ablation_figure(ablation_table(records, param), param), key=f"reference-ablation-{param}")
    by_value = {float(r["config"][param]): r for r in records}
    value = st.select_slider(f"Reference point ({param})", options=list(by_value), key=f"reference-point-{param}")
    rec = by_value[value]
    pgd = rec["eval"].get("pgd20", {})
    cols = st.columns(3)
    cols[0].metric("clean", f"{rec['eval']['clean']['mean']:.1%}" if "clean" in rec["eval"] else "–")
    cols[1].metric("PGD-20 mean", f"{pgd['mean']:.1%}" if pgd else "–")
    cols[2].metric("PGD-20 worst class", f"{pgd['worst']:.1%}" if pgd else "–")
    if st.button("Reproduce live", key=f"reference-reproduce-{param}",
                 help="Queue this point's exact config as a run of your own (Live run page)."):
        run_id = submit(reproduce(rec), f"reproduce reference {param}={value:g}")
        st.success(f"Queued {run_id}; follow it on the Live run page.")
