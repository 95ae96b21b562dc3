"""Entry point of ``wpatch``."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Weight Patching for language models.")


@app.command()
def demo() -> None:
    """Run the whole pipeline on the embedded model pair."""
    typer.echo("wpatch demo: not yet (the embedded pair lands with issue 4)")


if __name__ == "__main__":
    app()
