"""`rpiq plan` and `rpiq bench`: memory plans from configs, and the benchmark scripts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import _fail, console, out


def plan(
    model: Annotated[str, typer.Argument(help="'cogvlm2' (built-in config numbers) or a model directory")] = "cogvlm2",
    bits: Annotated[int, typer.Option(help="bits of the quantized linears")] = 4,
    group_size: Annotated[int, typer.Option(help="columns per scale/zero group; -1 = per channel")] = 128,
    nsamples: Annotated[int, typer.Option(min=1, help="calibration windows, for the calibration memory lines")] = 128,
    seqlen: Annotated[int, typer.Option(min=1, help="tokens per calibration window")] = 2048,
) -> None:
    """Weight memory of MODEL in 16-bit and quantized (GPTQ format), per component, from its config;
    then what sequential and single-instance calibration keep resident."""
    from rpiq.plan import calibration_memory, load_config, meta_model, plan_model
    from rpiq.plan_report import calibration_lines, print_plan

    try:
        config, name = load_config(model)
        meta = meta_model(config)
        result = plan_model(meta, name, bits, group_size)
        memory = calibration_memory(meta, nsamples, seqlen)
    except (ValueError, OSError) as e:
        _fail(str(e))
    print_plan(result, out)
    for line in calibration_lines(memory, nsamples, seqlen):
        out.print(line, highlight=False, soft_wrap=True)


BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _benchmarks() -> dict[str, str]:
    """Benchmark scripts of the source checkout: name -> first line of its docstring."""
    import ast

    out = {}
    for f in sorted(BENCHMARKS_DIR.glob("*.py")):
        source = f.read_text(encoding="utf-8")
        if "__main__" in source:  # a runnable script, not a helper module such as memory.py
            doc = ast.get_docstring(ast.parse(source)) or ""
            out[f.stem] = doc.splitlines()[0] if doc else ""
    return out


def bench(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="benchmark to run (omit to list them)")] = None,
) -> None:
    """Run a benchmark script from benchmarks/ (e.g. `rpiq bench report --quick`); extra options go to it.

    Benchmarks print a table and save JSON; they live in the source checkout, not in the wheel.
    """
    import subprocess

    if not BENCHMARKS_DIR.is_dir():
        _fail(f"no benchmarks/ directory next to the rpiq package ({BENCHMARKS_DIR}); run from a source checkout")
    found = _benchmarks()
    if name is None:
        for stem, line in found.items():
            console.print(f"[bold]{stem}[/bold]  {line}")
        return
    if name not in found:
        _fail(f"unknown benchmark {name!r}; choose one of: {', '.join(found)}")
    cmd = [sys.executable, str(BENCHMARKS_DIR / f"{name}.py"), *ctx.args]
    raise typer.Exit(subprocess.run(cmd, check=False).returncode)
