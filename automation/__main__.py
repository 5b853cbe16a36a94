from automation.cli import run_cli

run_cli()
