"""A synthetic "descriptiveness" world, built compositionally from word lists.

Prompts ask to describe a place at a time ("Describe the harbor at dawn."). Answers are
either plain ("It was fine.") or descriptive: a sentence naming 1-4 distinct nouns, each
with exactly one sensory adjective ("The harbor at dawn had cold wind, golden light and
quiet boats."). The preference a person can read: more sensory detail is better. At most
one adjective per noun keeps the property one a tiny reward model can see (DESIGN.md).
"""

from __future__ import annotations

import random

PLACES = [
    "harbor", "forest", "market", "library", "desert", "village", "river", "garden", "station", "mountain",
    "beach", "kitchen", "castle", "meadow", "bridge", "valley", "island", "street", "temple", "orchard",
    "canyon", "lake", "farm", "museum", "plaza", "lighthouse", "cave", "bakery", "field", "city",
]
TIMES = ["dawn", "noon", "dusk", "night", "midnight", "sunrise", "sunset", "winter"]
NOUNS = ["light", "wind", "air", "sounds", "smells", "stones", "water", "trees", "shadows", "voices", "bells", "clouds"]
ADJECTIVES = ["golden", "cold", "warm", "soft", "bright", "quiet", "sweet", "sharp", "dark", "fresh", "gentle", "loud",
              "silver", "misty", "rough", "glowing"]
PLAIN = ["It was fine.", "It was okay.", "Nothing much.", "It was there.", "It was normal.", "Not much to say."]


def prompt_text(place: str, time: str) -> str:
    return f"Describe the {place} at {time}."


def all_prompts() -> list[tuple[str, str]]:
    return [(p, t) for p in PLACES for t in TIMES]


def split_prompts(seed: int, eval_count: int = 48) -> tuple[list[str], list[str]]:
    """Held-out prompts never seen in SFT or RM training."""
    pairs = all_prompts()
    random.Random(seed).shuffle(pairs)
    texts = [prompt_text(p, t) for p, t in pairs]
    return texts[eval_count:], texts[:eval_count]


def descriptive(place: str, time: str, details: int, rng: random.Random) -> str:
    nouns = rng.sample(NOUNS, details)
    adjectives = rng.sample(ADJECTIVES, details)
    items = [f"{a} {n}" for a, n in zip(adjectives, nouns)]
    listed = items[0] if details == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"The {place} at {time} had {listed}."


def plain(rng: random.Random) -> str:
    return rng.choice(PLAIN)


def detail_count(response: str) -> int:
    """How many sensory adjectives a response uses (the property the RM learns)."""
    words = response.replace(",", " ").replace(".", " ").split()
    return sum(w in ADJECTIVES for w in words)


def parse_prompt(prompt: str) -> tuple[str, str]:
    words = prompt.rstrip(".").split()
    return words[2], words[4]


def sft_example(prompt: str, rng: random.Random, descriptive_fraction: float = 0.3) -> str:
    """An SFT answer: plain with probability 1 - descriptive_fraction, else 1-4 details."""
    place, time = parse_prompt(prompt)
    if rng.random() >= descriptive_fraction:
        return plain(rng)
    return descriptive(place, time, rng.randint(1, 4), rng)


def preference_pair(prompt: str, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): the chosen answer carries strictly more detail."""
    place, time = parse_prompt(prompt)
    low, high = sorted(rng.sample(range(0, 5), 2))

    def answer(details: int) -> str:
        return plain(rng) if details == 0 else descriptive(place, time, details, rng)

    return answer(high), answer(low)
