"""perp's command line: one module per subcommand; `app` only registers them."""
