"""yikatong: city one-card (一卡通) smart-card transaction simulator and audit service."""

from importlib.metadata import version

__version__ = version("yikatong")  # one source, pyproject.toml; audit.findings reads the same metadata
