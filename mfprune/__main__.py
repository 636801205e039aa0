from mfprune.cli import app

app(prog_name="mfprune")
