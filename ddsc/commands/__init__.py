"""``ddsc`` subcommands: argument parsing and a call into the library, one module per command."""
