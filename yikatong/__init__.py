"""yikatong: city one-card (一卡通) smart-card transaction simulator and audit service."""

__version__ = "0.1.0"
