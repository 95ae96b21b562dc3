"""The ``wpatch`` command line: one small module per subcommand over pydantic configs."""
