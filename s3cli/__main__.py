from s3cli.cli.main import app

app(prog_name="s3")
