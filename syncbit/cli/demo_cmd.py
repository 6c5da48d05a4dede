"""``syncbit demo``: placeholder replaced below."""
import click


@click.command()
def demo():
    """Run the local demo."""
    raise click.ClickException("not yet")
