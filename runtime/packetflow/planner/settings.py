"""The planner's configuration: ``PACKETFLOW_PLANNER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1",
                     "anthropic": "https://api.anthropic.com"}


class PlannerSettings(BaseSettings):
    """How plans are made, checked, run and learned from."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_PLANNER_", frozen=True)

    provider: Literal["", "openai", "anthropic"] = Field(
        default="", description="Language model API: openai (any OpenAI-compatible chat "
                                "completions endpoint) or anthropic; empty: built-in only")
    base_url: str | None = Field(default=None, pattern=r"^https?://",
                                 description="API base URL; default: the provider's own")
    model: str = Field(default="", description="Model name sent to the API")
    api_key: SecretStr | None = Field(default=None, description="API key (from a Secret)")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600,
                                   description="One model call's time limit")
    max_repairs: int = Field(default=2, ge=0, le=10,
                             description="Times the checker's errors go back to the model "
                                         "before the built-in planner takes over")
    max_steps: int = Field(default=4, ge=1, le=8, description="Steps a built-in plan may have")
    max_intent_chars: int = Field(default=2000, ge=10, le=100_000)
    prompt_capabilities: int = Field(default=24, ge=1, le=500,
                                     description="Most relevant capabilities shown to a model")
    execution_timeout_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="Deadline of an execution the caller gave "
                                                 "none")
    embeddings: bool = Field(default=True, description="Use the embeddings extra for "
                                                       "retrieval when it is installed")
    store_dsn: str | None = Field(
        default=None, description="PostgreSQL shared by every replica for outcomes and "
                                  "cached plans; unset: SQLite planner.db under the state dir")

    def endpoint(self) -> str:
        """The API base URL in use."""
        return (self.base_url or DEFAULT_BASE_URLS.get(self.provider, "")).rstrip("/")
