"""Live run: configure, start / stop / resume, and watch a run's charts update while it trains."""

import time
from collections import Counter

import streamlit as st

from app import charts, frames
from app.state import get_registry, get_store, run_events
from app.uploads import MAX_UPLOAD_BYTES, accept_checkpoint
from app.widgets import config_form, default_config, format_eta
from ferd import events as ev
from ferd.config import ConfigError, from_dict
from ferd.labels import run_label
from ferd.teachers import TeacherError

POLL_S = 1.0
FIRST_EVENT_WAIT_S = 1.0
RUN_KEY = "live-run"

registry = get_registry()
store = get_store()

st.title("Live run")

# Collapsed while a run is live, so its progress and charts are in view (a new label makes a new expander).
busy = bool(registry.alive_ids())
with st.expander("Configure another run" if busy else "Configure a run", expanded=not busy):
    cfg = config_form(default_config(), key="live")
    upload = st.file_uploader(f"Teacher checkpoint (optional, .pt/.pth, at most {MAX_UPLOAD_BYTES // 2**20} MB)",
                              type=["pt", "pth"], key="live-teacher-upload",
                              help="Weights of the preset's teacher architecture (plain state_dict, 'module.' "
                                   "prefixes, or under 'state_dict' / 'model_state_dict'); loaded with "
                                   "weights_only=True and checked before a run may use it.")
    if upload is not None and cfg is not None:
        try:
            cfg = accept_checkpoint(upload.getvalue(), upload.name, cfg, store.root)
            st.caption(f"Teacher: {upload.name} ({cfg.teacher_arch}) checked and stored.")
        except (TeacherError, ConfigError) as e:
            st.error(f"Teacher checkpoint rejected: {e}")
            cfg = None
    name = st.text_input("Run name (optional)", key="live-name")
    if st.button("Start", type="primary", disabled=cfg is None, key="live-start"):
        st.session_state[RUN_KEY] = started = registry.submit(cfg, name=name)
        deadline = time.monotonic() + FIRST_EVENT_WAIT_S  # draw the run with its first event (e.g. its teacher stage)
        while registry.is_alive(started) and not registry.events(started) and time.monotonic() < deadline:
            time.sleep(0.05)
        st.rerun()  # redraw with the form collapsed

runs = store.list_runs()
if not runs:
    st.info("No runs yet: configure one above and press Start.")
    st.stop()
infos = {r.run_id: r for r in runs}  # newest first
if st.session_state.get(RUN_KEY) not in infos:
    st.session_state[RUN_KEY] = runs[0].run_id  # open on the newest run


def _label(run_id: str) -> str:
    """Stable while the run progresses (a selectbox keeps its selection by label); the status shows below."""
    info = infos[run_id]
    return run_label(run_id, info.config, info.name)


def _distinct(labels: dict[str, str]) -> dict[str, str]:
    """Labels made unique with the run id where two runs share one: a selectbox maps a label back to the
    last option carrying it, so a shared label would pick (and Resume) the older run."""
    counts = Counter(labels.values())
    return {i: f"{text} · {i}" if counts[text] > 1 else text for i, text in labels.items()}


labels = _distinct({i: _label(i) for i in infos})
pick, stop_col, resume_col = st.columns([6, 1, 1], vertical_alignment="bottom")
run_id = pick.selectbox("Run", list(infos), format_func=labels.__getitem__, key=RUN_KEY)
alive = registry.is_alive(run_id)
if stop_col.button("Stop", disabled=not alive, key="live-stop"):
    registry.stop(run_id)
    st.toast("Stop requested; the run ends after its current step.")
resumable = not alive and infos[run_id].status in ("stopped", "interrupted", "failed")
if resume_col.button("Resume", disabled=not resumable, key="live-resume"):
    try:
        registry.submit(from_dict(infos[run_id].config), resume_run_id=run_id)
    except (ConfigError, ValueError) as e:
        st.error(f"Cannot resume {run_id}: {e}")


def _ceiling(dataset: str) -> float | None:
    """PGD-20 mean of the newest finished real-data run on the same dataset (the data-free ceiling)."""
    for info in store.list_runs(status="finished"):
        if info.method == "real-data" and info.dataset == dataset:
            return frames.headline(run_events(info.run_id)).get("pgd20_mean")
    return None


def _epoch_slider(epochs: list[int], key: str) -> int:
    """Scrub through `epochs`; follows the newest epoch until the user moves it elsewhere."""
    if len(epochs) == 1:
        return epochs[0]
    newest_key = f"{key}-newest"
    if st.session_state.get(key) in (None, st.session_state.get(newest_key)) or st.session_state[key] not in epochs:
        st.session_state[key] = epochs[-1]
    st.session_state[newest_key] = epochs[-1]
    return st.select_slider("Epoch", epochs, key=key)


PROGRESS_KINDS = ("generator_progress", "student_progress", "stage_progress")


def _cached(name: str, key: tuple, build):
    """The value `build()` returned for the same `key` on an earlier tick of this session, else build it.

    The polling fragment runs every second in the server process, which also runs the training thread:
    rebuilding pandas frames and plotly figures on every tick competes with training for the GIL, so
    charts are rebuilt only when an epoch-level event arrived (step-level progress events only move
    the progress bar)."""
    cache = st.session_state.setdefault("live-chart-cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, build())
    return hit[1]


def _strength_metrics(frame) -> None:
    """The latest epoch's training-attack success rate and target entropy, and the latest reference beside them."""
    if frame.empty:
        return
    last = frame.iloc[-1]
    ref = frame.dropna(subset=["reference_success_rate"])
    cols = st.columns(3)
    cols[0].metric("attack success", f"{last['success_rate']:.0%}", help="Share of this epoch's adversarial examples "
                   "the student (eval mode) assigns to a class other than y, the label the attack works against.")
    cols[1].metric("target entropy", f"{last['target_entropy']:.2f}", help="Mean row entropy of the attack-target "
                   "histogram / log(C-1): 1 = each class pushed evenly to all others.")
    if not ref.empty:
        r = ref.iloc[-1]
        cols[2].metric(f"untargeted reference (epoch {int(r['epoch'])})", f"{r['reference_success_rate']:.0%}",
                       help="An untargeted KL-PGD on the same batches: the strength the training attack gives up.")


@st.fragment(run_every=POLL_S)
def live_view(run_id: str, alive: bool) -> None:
    if alive and not registry.is_alive(run_id):
        st.rerun()  # the run just ended: redraw the whole page (run picker, Stop / Resume buttons)
    events = run_events(run_id)
    # Changes when an event other than per-step progress arrives (or the run ends).
    version = (run_id, sum(1 for e in events if e.kind not in PROGRESS_KINDS))
    job = registry.job(run_id)
    if job is not None and job.status == "queued":
        st.info(f"Queued (#{job.position}): waits for the run ahead of it on the same device.")
    epoch, total, eta = frames.progress(events)
    end = frames.terminal(events)
    stage = frames.current_stage(events)
    status = {"run_finished": "finished", "run_stopped": "stopped", "run_failed": "failed"}.get(
        end.kind if end else "", "running" if events else "starting")
    if stage is not None and stage.stage == "teacher":
        status = "training the teacher"
    st.progress(epoch / total if total else 0.0,
                text=f"Epoch {epoch}/{total or '?'} · {status}" + (f" · {format_eta(eta)}" if eta else ""))
    if stage is not None:
        st.progress(stage.step / max(stage.total_steps, 1), text=frames.stage_text(stage))
    if isinstance(end, ev.RunFailed):
        st.error(f"Run failed: {end.reason}")
    elif isinstance(end, ev.RunStopped):
        st.info(f"Run stopped: {end.reason}")
    for message in _cached("warnings", version, lambda: frames.warnings(events) + frames.synthesis_warnings(events)):
        st.warning(message)

    metrics = _cached("headline", version, lambda: frames.headline(events))
    if metrics:
        cols = st.columns(4)
        cols[0].metric("clean", f"{metrics.get('clean_mean', float('nan')):.1%}")
        cols[1].metric("PGD-20 mean", f"{metrics.get('pgd20_mean', float('nan')):.1%}")
        cols[2].metric("PGD-20 worst class", f"{metrics.get('pgd20_worst', float('nan')):.1%}")
        cols[3].metric("PGD-20 NSD", f"{metrics.get('pgd20_nsd', float('nan')):.3f}")

    names = frames.class_names(events) or None
    left, right = st.columns(2)
    left.plotly_chart(_cached("weights", version, lambda: charts.weights_chart(
        frames.weights_frame(events), names, reweight=frames.reweighting(events))), key="live-weights")
    with right:
        acc = _cached("accuracy-frame", version, lambda: frames.accuracy_frame(events))
        attacks = list(dict.fromkeys(acc["attack"])) or ["pgd20"]
        attack = st.segmented_control("Attack", attacks, default="pgd20" if "pgd20" in attacks else attacks[0],
                                      key="live-attack") or attacks[0]
        wants_ceiling = attack == "pgd20" and infos[run_id].method != "real-data"
        ceiling = _cached("ceiling", version, lambda: _ceiling(infos[run_id].dataset)) if wants_ceiling else None
        st.plotly_chart(_cached("accuracy", (*version, attack, ceiling),
                                lambda: charts.accuracy_chart(acc, attack, names, ceiling=ceiling)),
                        key="live-accuracy")

    left, right = st.columns(2)
    with left:
        source = st.radio("Attack targets of", ["train", "eval"], horizontal=True, key="live-target-source",
                          format_func={"train": "training attacks (synthetic)", "eval": "PGD-20 on the test split"}.get)
        epochs = frames.target_epochs(events, source)
        if epochs:
            shown = _epoch_slider(epochs, key=f"live-target-epoch-{source}-{run_id}")
            title = f"Attack targets, epoch {shown} ({source})"
            st.plotly_chart(_cached("targets", (*version, source, shown), lambda: charts.targets_heatmap(
                frames.targets_matrix(events, shown, source), names, title=title)), key="live-targets")
        else:
            st.caption("No attack targets yet.")
    with right:
        strength = _cached("strength-frame", version, lambda: frames.attack_strength_frame(events))
        _strength_metrics(strength)
        st.plotly_chart(_cached("strength", version, lambda: charts.attack_strength_chart(strength)),
                        key="live-strength")
    left, right = st.columns(2)
    left.plotly_chart(_cached("synthesis", version, lambda: charts.synthesis_chart(frames.synthesis_frame(events))),
                      key="live-synthesis")
    right.plotly_chart(_cached("losses", version, lambda: charts.losses_chart(frames.losses_frame(events))),
                       key="live-losses")


live_view(run_id, alive)
