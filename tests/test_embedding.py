"""2-D maps: PCA, the UMAP service (fallback, caching, projection, serialised fits) and the figure."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest

from app import umap_worker
from app.embedding import PCA, UMAP, UmapService, collect_samples, embedding_figure, pca_2d, upscale_nearest
from ferd.events import SamplesSynthesised


def test_pca_shape_and_leading_direction():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)) * np.array([10.0, 1, 1, 1, 1, 1])
    out = pca_2d(x)
    assert out.shape == (50, 2)
    # the first component follows the high-variance axis
    assert abs(np.corrcoef(out[:, 0], x[:, 0])[0, 1]) > 0.99
    assert np.allclose(pca_2d(x), out)


@pytest.mark.parametrize("shape", [(0, 5), (1, 5), (4, 1)])
def test_pca_degenerate_inputs(shape):
    out = pca_2d(np.ones(shape))
    assert out.shape == (shape[0], 2) and np.isfinite(out).all()


class _FakeUMAP:
    """Stands in for umap.UMAP: records overlapping calls (which the real one crashes on)."""

    active = 0
    overlaps = 0
    fits = 0
    guard = threading.Lock()

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def _enter(self):
        with _FakeUMAP.guard:
            _FakeUMAP.active += 1
            _FakeUMAP.overlaps += _FakeUMAP.active > 1
        time.sleep(0.02)
        with _FakeUMAP.guard:
            _FakeUMAP.active -= 1

    def fit(self, x):
        self._enter()
        return self

    def fit_transform(self, x):
        self._enter()
        _FakeUMAP.fits += 1
        return x[:, :2] * 2.0

    def transform(self, x):
        self._enter()
        return x[:, :2] * 2.0 + 100.0


@pytest.fixture
def fake_umap(monkeypatch):
    _FakeUMAP.active = _FakeUMAP.overlaps = _FakeUMAP.fits = 0
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    return _FakeUMAP


def test_embed_is_pca_until_warm(fake_umap):
    svc = UmapService(isolate=False)
    x = np.random.default_rng(0).standard_normal((40, 5))
    coords, method = svc.embed(x, "k")
    assert method == PCA and np.allclose(coords, pca_2d(x))
    svc.warm_up().join(5)
    assert svc.ready
    coords, method = svc.embed(x, "k")
    assert method == UMAP and np.allclose(coords, 2 * x[:, :2])


def test_embed_projects_appended_samples_without_moving_old_ones(fake_umap):
    svc = UmapService(isolate=False)
    svc.warm_up().join(5)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 4))
    first, _ = svc.embed(x, "run")
    grown = np.concatenate([x, rng.standard_normal((5, 4))])
    coords, method = svc.embed(grown, "run")
    assert method == UMAP and coords.shape == (35, 2)
    assert np.allclose(coords[:30], first)
    assert np.allclose(coords[30:], 2 * grown[30:, :2] + 100)  # projected, not refitted
    assert fake_umap.fits == 1
    prefix, _ = svc.embed(x[:20], "run")
    assert np.allclose(prefix, first[:20])


def test_embed_uses_pca_for_too_few_samples(fake_umap):
    svc = UmapService(min_samples=16, isolate=False)
    svc.warm_up().join(5)
    _, method = svc.embed(np.ones((5, 3)), "small")
    assert method == PCA


def test_transform_needs_a_fitted_map(fake_umap):
    with pytest.raises(RuntimeError, match="fit"):
        UmapService(isolate=False).transform(np.ones((3, 4)))


def test_concurrent_fits_are_serialised(fake_umap):
    svc = UmapService(isolate=False)
    rng = np.random.default_rng(2)
    data = [rng.standard_normal((30, 4)) for _ in range(4)]
    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, svc.fit(data[i], i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert fake_umap.overlaps == 0
    assert all(np.allclose(results[i], 2 * data[i][:, :2]) for i in range(4))


def test_failed_warm_up_keeps_pca(monkeypatch):
    def broken(**kwargs):
        raise ImportError("no numba here")

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=broken))
    svc = UmapService(isolate=False)
    svc.warm_up().join(5)
    assert not svc.ready and "no numba" in svc.error
    _, method = svc.embed(np.random.default_rng(0).standard_normal((40, 3)), "k")
    assert method == PCA


@pytest.mark.slow
def test_real_umap_warm_up_then_two_threads_fit_at_once():
    svc = UmapService()  # in its worker process
    assert svc._call(umap_worker.pid) != os.getpid()
    svc.warm_up().join(300)
    assert svc.ready, svc.error
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((80, 16)).astype(np.float32) for _ in range(2)]
    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, svc.embed(data[i], i)[0]))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(results[i].shape == (80, 2) and np.isfinite(results[i]).all() for i in range(2))
    assert svc.transform(data[0][:5], key=0).shape == (5, 2)
    svc.close()


def test_a_dead_worker_leaves_pca_and_says_why():
    svc = UmapService()
    worker = svc._call(umap_worker.pid)
    assert worker != os.getpid()
    os.kill(worker, signal.SIGKILL)
    svc._ready.set()  # as if warm: the next map would be a UMAP fit in the (now dead) worker
    coords, method = svc.embed(np.random.default_rng(0).standard_normal((40, 3)), "k")
    assert method == PCA and coords.shape == (40, 2)
    assert "worker stopped" in svc.error and not svc.ready


def test_embedding_figure_colours_by_class_per_method_palette_and_symbols_by_method():
    coords = np.arange(12, dtype=float).reshape(6, 2)
    fig = embedding_figure(coords, [0, 1, 0, 1, 2, 2], ["ferd", "ferd", "dfrd", "dfrd", "ferd", "dfrd"],
                           [10, 11, 12, 13, 14, 15], class_names=["zero", "one", "two"])
    assert all(t.type == "scattergl" for t in fig.data)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"ferd · zero", "ferd · one", "ferd · two", "dfrd · zero", "dfrd · one", "dfrd · two"}
    assert list(by_name["dfrd · zero"].customdata) == [12]
    ferd = {by_name[f"ferd · {n}"].marker.color for n in ("zero", "one", "two")}
    dfrd = {by_name[f"dfrd · {n}"].marker.color for n in ("zero", "one", "two")}
    assert len(ferd) == len(dfrd) == 3 and not ferd & dfrd  # a class colour within a method, none shared
    assert {by_name[f"ferd · {n}"].marker.symbol for n in ("zero", "one", "two")} == {"circle"}
    assert by_name["ferd · zero"].marker.symbol != by_name["dfrd · zero"].marker.symbol
    assert by_name["dfrd · one"].legendgroup == "dfrd"
    with pytest.raises(ValueError):
        embedding_figure(coords, [0], ["ferd"], [0])


def _samples(epoch: int, n: int, *, seed: int = 0, dim: int = 6, side: int = 4) -> SamplesSynthesised:
    rng = np.random.default_rng(seed + epoch)
    labels = rng.integers(0, 3, n)
    return SamplesSynthesised(
        epoch=epoch, images=rng.integers(0, 256, (n, side, side, 1), dtype=np.uint8), labels=labels,
        features=rng.standard_normal((n, dim)).astype(np.float32), teacher_pred=labels, teacher_acc=1.0,
        teacher_conf=1.0, class_acc=np.ones(3), class_conf=np.ones(3), robust_fraction=0.5,
        memory_counts=np.bincount(labels, minlength=3))


def test_collect_samples_orders_by_epoch_then_run_so_later_epochs_append():
    a = [_samples(1, 3), _samples(2, 3)]
    b = [_samples(1, 2, seed=9), _samples(2, 2, seed=9)]
    full = collect_samples([("A", "ferd", a), ("B", "dfrd", b)])
    assert list(full.table["run_id"]) == ["A"] * 3 + ["B"] * 2 + ["A"] * 3 + ["B"] * 2
    assert list(full.table["id"]) == list(range(10))
    assert full.images.shape == (10, 4, 4, 1) and full.features.shape == (10, 6)
    assert np.array_equal(full.features[3:5], b[0].features)
    early = collect_samples([("A", "ferd", a), ("B", "dfrd", b)], max_epoch=1)
    assert np.array_equal(early.features, full.features[:5])
    assert collect_samples([("A", "ferd", [])]).table.empty


def test_collect_samples_rejects_mixed_teachers():
    with pytest.raises(ValueError, match="same teacher"):
        collect_samples([("A", "ferd", [_samples(1, 2)]), ("B", "dfrd", [_samples(1, 2, dim=9)])])


def test_upscale_nearest_repeats_pixels_and_drops_grey_channel():
    img = np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1)
    out = upscale_nearest(img, size=8)
    assert out.shape == (1, 8, 8)
    assert (out[0, :4, :4] == 0).all() and (out[0, 4:, 4:] == 3).all()
    rgb = upscale_nearest(np.zeros((2, 16, 16, 3), np.uint8))
    assert rgb.shape == (2, 64, 64, 3)


def test_the_worker_does_not_rerun_the_parents_main_script(tmp_path, monkeypatch):
    """Under `streamlit run` the app script is `__main__`; a spawned worker must not execute it again."""
    marker = tmp_path / "ran"
    script = tmp_path / "app_script.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('the worker ran the app script')\n")
    app_main = types.ModuleType("__main__")
    app_main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", app_main)
    svc = UmapService()
    try:
        assert svc._call(umap_worker.pid) != os.getpid()
    finally:
        svc.close()
    assert not marker.exists()
    assert sys.modules["__main__"] is app_main  # put back after the worker started
