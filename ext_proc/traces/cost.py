"""Call cost in USD from token usage and a versioned price table.

The collector prices each trace once, when it writes it, and stores the table version
beside the cost, so a later price change never rewrites stored costs. An unknown model or
a call without usage gets no cost (NULL), never 0.

Prices are USD per 1M tokens: input, output and cached input. Cached tokens are counted
inside ``tokens_in`` (as OpenAI reports ``prompt_tokens``), so they are billed at the
cached price instead of the input price. Reasoning tokens are inside ``tokens_out``.

An operator overrides or adds models with ``$XENOVIA_HOME/config/prices.json``::

    {"version": "acme-2025-07", "models": {"my-model": {"input": 1.0, "output": 2.0,
     "cached_input": 0.5}}}
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# NOTE: list prices as published by the providers in mid 2025; check them before billing.
PRICE_TABLE_VERSION = "2025-07-01"


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None


# Model name -> (input, output, cached input) in USD per 1M tokens.
_BUILTIN_PRICES: dict[str, tuple[float, float, float | None]] = {
    # OpenAI
    "gpt-4o": (2.50, 10.00, 1.25),
    "gpt-4o-mini": (0.15, 0.60, 0.075),
    "gpt-4.1": (2.00, 8.00, 0.50),
    "gpt-4.1-mini": (0.40, 1.60, 0.10),
    "gpt-4.1-nano": (0.10, 0.40, 0.025),
    "gpt-4-turbo": (10.00, 30.00, None),
    "gpt-4": (30.00, 60.00, None),
    "gpt-3.5-turbo": (0.50, 1.50, None),
    "o1": (15.00, 60.00, 7.50),
    "o1-mini": (1.10, 4.40, 0.55),
    "o3": (2.00, 8.00, 0.50),
    "o3-mini": (1.10, 4.40, 0.55),
    "o4-mini": (1.10, 4.40, 0.275),
    "text-embedding-3-small": (0.02, 0.0, None),
    "text-embedding-3-large": (0.13, 0.0, None),
    "text-embedding-ada-002": (0.10, 0.0, None),
    # Anthropic (cached input is the cache-read price)
    "claude-3-5-sonnet": (3.00, 15.00, 0.30),
    "claude-3-7-sonnet": (3.00, 15.00, 0.30),
    "claude-sonnet-4": (3.00, 15.00, 0.30),
    "claude-3-5-haiku": (0.80, 4.00, 0.08),
    "claude-3-haiku": (0.25, 1.25, 0.03),
    "claude-3-opus": (15.00, 75.00, 1.50),
    "claude-opus-4": (15.00, 75.00, 1.50),
    # Google (prompts up to 128k/200k tokens)
    "gemini-1.5-flash": (0.075, 0.30, None),
    "gemini-1.5-pro": (1.25, 5.00, None),
    "gemini-2.0-flash": (0.10, 0.40, 0.025),
    "gemini-2.5-flash": (0.30, 2.50, 0.075),
    "gemini-2.5-pro": (1.25, 10.00, 0.31),
    # Groq
    "llama-3.1-8b-instant": (0.05, 0.08, None),
    "llama-3.3-70b-versatile": (0.59, 0.79, None),
}

# Served model names carry a release date: gpt-4o-mini-2024-07-18, claude-3-5-sonnet-20241022,
# gpt-4-0613. Anthropic also serves "-latest" aliases.
_RELEASE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")


class PriceTable:
    """Prices by model name, with the version string stored beside every cost."""

    def __init__(self, prices: dict[str, Price], version: str) -> None:
        self.prices = prices
        self.version = version

    @classmethod
    def builtin(cls) -> PriceTable:
        prices = {name: Price(*values) for name, values in _BUILTIN_PRICES.items()}
        return cls(prices, PRICE_TABLE_VERSION)

    @classmethod
    def load(cls, override_path: Path | None) -> PriceTable:
        """Return the built-in table, merged with the override file when it exists."""
        table = cls.builtin()
        if override_path is None or not override_path.is_file():
            return table
        try:
            document = json.loads(override_path.read_text())
            overrides = _parse_overrides(document)
        except (OSError, ValueError) as exc:
            logger.error("ignoring invalid price file %s: %s", override_path, exc)
            return table
        table.prices.update(overrides)
        version = str(document.get("version") or "custom")
        table.version = f"{PRICE_TABLE_VERSION}+{version}"
        logger.info("loaded %d model prices from %s", len(overrides), override_path)
        return table

    def lookup(self, model: str) -> Price | None:
        """Return the price of ``model``, trying it without a provider prefix or release suffix."""
        name = model.strip().lower()
        if not name:
            return None
        candidates = [name]
        if "/" in name:
            candidates.append(name.rsplit("/", 1)[1])
        for candidate in list(candidates):
            candidates.append(_RELEASE_SUFFIX.sub("", candidate))
        for candidate in candidates:
            price = self.prices.get(candidate)
            if price is not None:
                return price
        return None

    def cost_usd(
        self,
        model: str,
        tokens_in: int | None,
        tokens_out: int | None,
        cached_tokens: int | None,
    ) -> float | None:
        """Return the call's cost, or None when the model is unknown or usage is missing."""
        if tokens_in is None and tokens_out is None:
            return None
        price = self.lookup(model)
        if price is None:
            return None
        cached = min(cached_tokens or 0, tokens_in or 0)
        uncached = (tokens_in or 0) - cached
        cached_price = price.cached_input if price.cached_input is not None else price.input
        total = uncached * price.input + cached * cached_price + (tokens_out or 0) * price.output
        return total / 1_000_000


def _parse_overrides(document: object) -> dict[str, Price]:
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ValueError('expected {"version": ..., "models": {name: {"input", "output"}}}')
    prices = {}
    for name, entry in document["models"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"price of {name!r} must be an object")
        try:
            cached = entry.get("cached_input")
            prices[name.lower()] = Price(
                input=float(entry["input"]),
                output=float(entry["output"]),
                cached_input=None if cached is None else float(cached),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"price of {name!r} needs numeric input and output") from exc
    return prices
