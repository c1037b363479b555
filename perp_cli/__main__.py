from perp_cli.cli import run

run()
