"""The `rpiq` command line: quantize, eval, generate, serve, plan, bench (one module per command)."""

from __future__ import annotations

import sys

import typer

from .commands import evaluate, generate, plan, quantize, serve

app = typer.Typer(
    help="RPIQ: 4-bit post-training quantization (GPTQ + Gauss-Seidel refinement) and an assistive "
    "edge inference server. Runs offline: MODEL is a local directory; omit it for the embedded "
    "default model (SmolLM2-135M-Instruct).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(quantize.quantize)
app.command("eval")(evaluate.eval_)
app.command()(generate.generate)
app.command()(serve.serve)
app.command()(plan.plan)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(plan.bench)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
