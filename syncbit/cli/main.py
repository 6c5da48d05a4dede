"""``syncbit``: the command-line entry point. One module per command group."""

from __future__ import annotations

import os
import sys

import click

from ..errors import SyncbitError
from . import agent_cmds, demo_cmd, server_cmds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="syncbit")
def cli() -> None:
    """Syncbit: datasets on a lazy, read-only FUSE mount over a content-addressed block cache."""


agent_cmds.register(cli)
server_cmds.register(cli)
cli.add_command(demo_cmd.demo)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except SyncbitError as e:
        if os.environ.get("SYNCBIT_DEBUG") == "1":
            raise
        click.echo(f"syncbit: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
