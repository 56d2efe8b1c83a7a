from toco_cli.main import app

app()
