"""Prompts for MTP self-distillation: training chat turns and the held-out set.

Training prompts are ``TEMPLATES x SUBJECTS`` (60 x 121 = 7260), shuffled with a fixed seed so
that any prefix mixes templates and subjects. Held-out prompts are the serving benchmark's
dataset (``serving/entrypoints/datasets/prompts.jsonl``); ``train_conversations`` leaves out
any training prompt that occurs there, so the two never share a prompt (they share styles and
some subjects, as real traffic would).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HELD_OUT = Path(__file__).resolve().parents[2] / "serving/entrypoints/datasets/prompts.jsonl"

TEMPLATES = [
    "How does {} work? Keep it simple.",
    "Write a haiku about {}.",
    "What are the pros and cons of {}?",
    "Tell me a fun story involving {}.",
    "Write a short email to a friend about {}.",
    "Explain {} like I am a beginner.",
    "What would happen if {} disappeared tomorrow?",
    "Give me a step-by-step guide to learning about {}.",
    "Compare {} with something from everyday life.",
    "Write a limerick about {}.",
    "What are common misconceptions about {}?",
    "Describe a day in the life of someone who studies {}.",
    "Why do people find {} interesting?",
    "Write a product description for a book about {}.",
    "Give me five quiz questions about {}, with answers.",
    "Write a dialogue between two friends discussing {}.",
    "What is the future of {}?",
    "Write a tweet about {}.",
    "Explain the science behind {}.",
    "Give some tips for a school project on {}.",
    "Write a poem about {}.",
    "Write four lines of verse about {}.",
    "Tell me something surprising about {}.",
    "What is the strangest fact about {}?",
    "Explain {} to a child.",
    "Explain {} in simple words for a young student.",
    "Summarise what {} is in a few sentences.",
    "Give a brief history of {}.",
    "Describe {} in a short paragraph.",
    "Write a paragraph describing {}.",
    "Give four facts about {}.",
    "List some interesting facts about {}.",
    "List three words you associate with {}.",
    "Write the first sentence of a novel about {}.",
    "Begin a short story about {}.",
    "What is {}?",
    "Why is {} important?",
    "Who should learn about {}, and why?",
    "Write a short speech about {}.",
    "Write a riddle whose answer is {}.",
    "What questions do scientists still ask about {}?",
    "Describe {} to someone who has never seen it.",
    "Write a short news report about {}.",
    "How has {} changed over the last hundred years?",
    "Give me a fun fact about {} I can share at dinner.",
    "Write a motivational quote inspired by {}.",
    "What can {} teach us about life?",
    "Write a short diary entry about {}.",
    "Explain {} in one sentence.",
    "What are three things everyone should know about {}?",
    "Write a song chorus about {}.",
    "What is the best way to explain {} to a friend?",
    "Outline an essay about {}.",
    "Write a short advertisement about {}.",
    "What mistakes do beginners make with {}?",
    "Give a short summary of how {} affects our daily lives.",
    "Describe the sounds, sights and smells of {}.",
    "Write a thank-you note inspired by {}.",
    "Pretend you are a tour guide and describe {}.",
    "Give an analogy that explains {}.",
]

SUBJECTS = [
    "coral reefs", "the French Revolution", "machine learning", "recycling", "penguins",
    "the Great Wall of China", "solar panels", "earthquakes", "jazz music", "the human brain",
    "origami", "hurricanes", "the Olympic Games", "vaccines", "dinosaurs", "rainbows",
    "cryptography", "the Amazon river", "gardening", "the water cycle", "democracy",
    "football", "submarines", "butterflies", "the theory of evolution", "video games",
    "mountain climbing", "tea", "wind turbines", "the Renaissance", "sharks", "bridges",
    "public libraries", "the immune system", "comets", "cooking pasta", "Mars rovers",
    "trains", "sleep", "the periodic table", "volcanoes", "the internet", "elephants",
    "the printing press", "chess", "honey bees", "the moon", "black holes", "electricity",
    "ancient Egypt", "photosynthesis", "clouds", "glaciers", "the ocean tides", "owls",
    "a lighthouse", "a bicycle", "the Roman Empire", "the solar system", "DNA", "music",
    "mathematics", "bread baking", "the human heart", "the speed of light", "a small robot",
    "a city at night", "winter in the mountains", "a rainy afternoon", "the stock market",
    "coffee", "rivers", "forests", "deserts", "the Arctic", "whales", "ants", "wolves",
    "airplanes", "rockets", "the telephone", "computers", "smartphones", "photography",
    "painting", "the violin", "the piano", "ballet", "poetry", "Shakespeare", "the Moon landing",
    "the Industrial Revolution", "the Vikings", "castles", "pyramids", "the Silk Road",
    "climate change", "rain forests", "snowflakes", "thunderstorms", "the northern lights",
    "gravity", "magnets", "atoms", "batteries", "bacteria", "the heart of a star",
    "friendship", "kindness", "time management", "learning a new language", "running",
    "yoga", "camping", "fishing", "the seasons", "a busy market", "a quiet village",
    "an old map", "a lost key", "a rainy day at school",
]


def train_conversations() -> list[list[dict]]:
    """Every training chat turn, in a fixed shuffled order; none is a held-out prompt."""
    held = {c[0]["content"] for c in held_out_conversations()}
    prompts = [t.format(s) for t in TEMPLATES for s in SUBJECTS]
    order = np.random.default_rng(0).permutation(len(prompts))
    return [[{"role": "user", "content": prompts[i]}] for i in order if prompts[i] not in held]


def held_out_conversations(limit: int | None = None) -> list[list[dict]]:
    """The serving benchmark's prompts as chat turns (none of them is a training prompt)."""
    with HELD_OUT.open() as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [[{"role": "user", "content": p}] for p in prompts[:limit]]
