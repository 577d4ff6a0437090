"""Prefect orchestration of the kseg pipeline. ``kseg`` itself imports nothing from here."""
