"""matplotlib, when it is installed: the optional ``plot`` extra of the reports."""

from __future__ import annotations

from typing import Any

from isc.errors import IscError


class PlotUnavailable(IscError, RuntimeError):
    """A plot was asked for but matplotlib is not installed."""


def require() -> None:
    """Check that matplotlib can be imported; raise :class:`PlotUnavailable` if not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib, which is not installed; "
            "install it with: pip install 'isc[plot]' (or pip install matplotlib)"
        ) from None


def figure(width: float, height: float) -> Any:
    """A new matplotlib ``Figure`` drawn by the Agg backend (no display, no global state).

    Raises :class:`PlotUnavailable` when matplotlib is not installed.
    """
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def granularity_axis(ax: Any, granularities: list[int], label: Any) -> None:
    """Put ``granularities`` on a log2 x axis of ``ax`` with ``label(g)`` tick labels."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(granularities)
    ax.set_xticklabels([label(g) for g in granularities])
    ax.minorticks_off()
    ax.set_xlabel("granularity")
    ax.grid(True, alpha=0.3)


def byte_unit(peak: float) -> tuple[float, str]:
    """The binary unit to show byte counts up to ``peak`` in: ``(bytes per unit, name)``."""
    scale, name = 1.0, "bytes"
    for power, unit in enumerate(("KiB", "MiB", "GiB", "TiB"), 1):
        if peak < 1 << (10 * power):
            break
        scale, name = float(1 << (10 * power)), unit
    return scale, name
