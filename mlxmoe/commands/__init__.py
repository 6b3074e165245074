"""The command line: one thin module per `mlxmoe` verb (parse options, call
the library, print). mlxmoe/cli.py loads them lazily."""
