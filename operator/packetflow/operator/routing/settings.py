"""Routing controller configuration: pydantic-settings from ``PACKETFLOW_*``, flags on top."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from packetflow.operator.routing.model import Tuning


class ControllerSettings(BaseSettings):
    """Where the metrics come from, how often the controller decides, what it assumes."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_", frozen=True, extra="ignore")

    prometheus_url: str = Field(default="http://127.0.0.1:9090", pattern=r"^https?://",
                                description="Prometheus' HTTP API base URL")
    controller_interval_seconds: float = Field(
        default=15.0, gt=0, description="How often every resource is decided")
    scrape_interval_seconds: float = Field(
        default=15.0, gt=0, description="Prometheus' scrape interval: one sample per step")
    rate_window_seconds: float | None = Field(
        default=None, gt=0, description="rate() range; default twice the scrape interval")
    history_seconds: float = Field(default=3600.0, gt=0,
                                   description="How far back the forecast looks")
    pod_startup_seconds: float = Field(
        default=30.0, gt=0, description="Pod start-up assumed until measured")
    effect_window_seconds: float = Field(
        default=600.0, gt=0, description="Before/after windows that judge an applied change")
    cooloff_seconds: float = Field(
        default=3600.0, ge=0, description="A kind of change that did not help waits this long")
    canary_soak_seconds: float = Field(
        default=600.0, ge=0, description="A canary is healthy this long before promotion")
    namespace_label: str = Field(
        default="namespace", description="Label carrying a series' namespace ('' for none)")
    version_label: str = Field(
        default="version", description="Label telling stable (stable) from canary (canary)")
    controller_metrics_address: str | None = Field(
        default="0.0.0.0:9466", description="host:port of the controller's /metrics; empty: off")
    state_dir: Path = Field(default=Path(".packetflow"),
                            description="Target mode: where approvals are kept")
    log_format: str = Field(default="json", pattern="^(json|text)$")
    log_level: str = "INFO"

    @property
    def rate_window(self) -> float:
        """The ``rate()`` range in seconds."""
        return self.rate_window_seconds or 2 * self.scrape_interval_seconds

    def tuning(self) -> Tuning:
        """The decision code's view of these settings."""
        return Tuning(interval_s=self.controller_interval_seconds,
                      startup_s=self.pod_startup_seconds,
                      effect_window_s=self.effect_window_seconds,
                      cooloff_s=self.cooloff_seconds, canary_soak_s=self.canary_soak_seconds)
