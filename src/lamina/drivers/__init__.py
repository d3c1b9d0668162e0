"""Drivers: where layer content lives. See :mod:`lamina.drivers.base` for the contract."""
