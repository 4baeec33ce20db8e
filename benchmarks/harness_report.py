"""The markdown table `run_all.py` writes to benchmarks/README.md."""

from __future__ import annotations

from typing import Any

# Row fields of the markdown table, in order, with their headers.
TABLE = (
    ("section", "section"),
    ("name", "what"),
    ("framework", "framework"),
    ("mode", "mode"),
    ("dtype", "dtype"),
    ("shape", "shape"),
    ("compile_s", "compile s"),
    ("median_s", "median s"),
    ("gflop_per_s", "GFLOP/s"),
    ("peak_fraction", "of peak"),
    ("voxels_per_s", "voxels/s"),
    ("jax_speedup_vs_torch", "JAX speed-up vs best torch"),
)


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "peak_fraction":
        return f"{100 * value:.0f}%"
    if key == "jax_speedup_vs_torch":
        return f"{value:.2f}x"
    if key == "voxels_per_s":
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/")


def markdown(payload: dict[str, Any]) -> str:
    """The README: how the numbers were taken, then one table row per result row."""
    env = payload["environment"]
    peaks = payload["peaks_gflop_per_s"]
    lines = [
        "# synjax benchmarks",
        "",
        "Written by `benchmarks/run_all.py` (do not edit by hand); JSON: "
        f"`{payload['out']}`. Every network row: compile time apart from the steady "
        "state (median of the timed calls after a warm-up, after `block_until_ready`); "
        "FLOPs from XLA's cost analysis of the compiled program (a program with oneDNN "
        "convolution calls, which XLA does not count: of the same program on XLA's own "
        'convolutions); "of peak" = achieved '
        "FLOP/s over this run's matmul peak of the row's dtype (bfloat16 rows: bfloat16 "
        "inputs, float32 accumulation). JAX speed-up vs best torch = the fastest PyTorch "
        "layout's median / JAX's median at the same mode and precision (> 1: JAX faster).",
        "",
        f"- command: `{payload['command']}`",
        f"- commit: {payload['commit']}",
        f"- Conv3D implementation (`--conv`): {payload.get('conv_implementation', 'auto')} "
        "(cold-start rows: the configs' own)",
        f"- host memory (`--host-memory`): {payload.get('host_memory', 'system')} (retain: "
        "glibc's malloc keeps freed memory for the next call, as `synjax.main` does; "
        "system: large buffers are unmapped when freed and faulted in again)",
        f"- date: {env['date']}",
        f"- device: {env['device_kind']} ({env['backend']}, {len(env['devices'])} device(s), "
        f"{env['cpu_count']} CPUs on the host)",
        f"- versions: python {env['python']}, jax {env['jax']}, "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()),
        f"- load average (1, 5, 15 min) before: {payload['load_average']['before']}, "
        f"after: {payload['load_average']['after']} (a shared machine: times are upper "
        "bounds)",
        f"- matmul peak: float32 {_cell(peaks.get('float32'), '')} GFLOP/s, bfloat16 "
        f"{_cell(peaks.get('bfloat16'), '')} GFLOP/s",
        f"- PyTorch: {payload['torch'] or 'timed in the same process'}",
        f"- wall time of the run: {payload['wall_s']:.0f} s",
        "",
        "| " + " | ".join(h for _, h in TABLE) + " |",
        "|" + "---|" * len(TABLE),
    ]
    for r in payload["rows"]:
        cells = [_cell(r.get(k), k) for k, _ in TABLE]
        if r.get("layout"):
            cells[2] += f" ({r['layout'].replace('_', ' ')})"
        lines.append("| " + " | ".join(cells) + " |")
    if payload["errors"]:
        lines += ["", "Sections that failed:", ""]
        lines += [f"- {name}: {message}" for name, message in payload["errors"].items()]
    if payload["not_run"]:
        lines += ["", f"Sections not run (yet): {', '.join(payload['not_run'])}"]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for name in ("jaxlib", "flax", "optax", "numpy", "scipy", "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
