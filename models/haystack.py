"""Offline needle-in-a-haystack prompts (RULER style) from text that ships with Python.

The haystack is CPython's `pydoc_data.topics` (about 465k characters of English documentation, always installed)
or RULER's repeated "noise" sentences; a needle sentence is placed at a chosen depth, and the question asks for it.
"""

from __future__ import annotations

import dataclasses
import random

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
CITIES = ("Zurich", "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Oaxaca", "Bergen", "Tromso")


def prose() -> str:
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  text: str  # the user message: haystack with the needle, then the question
  answer: str  # the expected value (RULER scores a string match)
  depth: float


def needle_prompt(*, chars: int, depth: float = 0.5, haystack: str = "prose", seed: int = 0) -> NeedlePrompt:
  """A single-needle question over about `chars` characters of haystack (~4 characters per token)."""
  if not 0 <= depth <= 1:
    raise ValueError(f"{depth=} must lie in [0, 1]")
  rng = random.Random(seed)
  source = prose() if haystack == "prose" else NOISE * (chars // len(NOISE) + 1)
  start = rng.randrange(0, max(1, len(source) - chars)) if haystack == "prose" else 0
  hay = source[start:start + chars]
  city, number = rng.choice(CITIES), str(rng.randrange(1000000, 9999999))
  needle = f" The special magic number for {city} is {number}. "
  cut = int(len(hay) * depth)
  cut = hay.rfind(" ", 0, cut) + 1 if " " in hay[:cut] else cut  # between words
  text = (f"Read the text below and answer the question after it.\n\n{hay[:cut]}{needle}{hay[cut:]}\n\n"
          f"Question: What is the special magic number for {city}? Answer with the number only.")
  return NeedlePrompt(text=text, answer=number, depth=depth)
