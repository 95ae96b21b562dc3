"""Entry point of ``wpatch``: one small module per subcommand, each flags -> config -> one pipeline
stage (:mod:`weightpatch.pipeline`). User errors print one line on stderr and exit with code 2."""

from typing import Annotated

import typer

from weightpatch.cli import anchor, check, demo, merge, report_cmd, screen, trace
from weightpatch.cli.options import Group

# plain (click) help: flags are never truncated, words never broken, help never read as Rich markup.
# Subcommand modules import torch and the pipeline only when they run, so help answers at once.
app = typer.Typer(cls=Group, no_args_is_help=True, rich_markup_mode=None, help="Weight Patching for language models.")


def _version(value: bool) -> None:
    if value:
        from weightpatch import __version__

        typer.echo(f"weightpatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit.")
    ] = False,
) -> None:
    """Weight Patching: find which of a specialized model's own parameters recreate its capability."""


for module in (check, anchor, screen, trace, merge, report_cmd, demo):
    module.register(app)


if __name__ == "__main__":
    app()
