"""Entry point of ``wpatch``: one small module per subcommand, each thin over a config in
:mod:`weightpatch.config`. User errors print one line on stderr and exit with code 2."""

import typer

from weightpatch.cli import anchor, check, demo, merge, report_cmd, screen, trace

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Weight Patching for language models.")


@app.callback()
def _main() -> None:
    """Weight Patching: find which of a specialized model's own parameters recreate its capability."""


for module in (check, anchor, screen, trace, merge, report_cmd, demo):
    module.register(app)


if __name__ == "__main__":
    app()
