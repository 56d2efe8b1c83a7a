"""``python -m fleet_server``: the ``toco-fleet`` command line, run by this interpreter (tests start the
server this way so the child runs the same code and environment as the test)."""

from fleet_server.cli import app

app(prog_name="toco-fleet")
