"""Dorothy: secure peer-to-peer transfer of digital evidence.

The code lives in the top-level folders protocol/, keys/, dorothyd/ and cli/;
pyproject.toml installs them as dorothy.protocol, dorothy.keys,
dorothy.dorothyd and dorothy.cli.
"""
