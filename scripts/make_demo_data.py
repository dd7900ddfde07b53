#!/usr/bin/env python3
"""Writes the project's own small demo data into datasets/demo/ (deterministic; no network):
  demonstrations.jsonl  {"prompt", "response"}: simple arithmetic, counting, reversing and
                        colour questions with short, consistent answers a tiny model can learn;
  prompts.jsonl         {"prompt"}: held-out prompts of the same kinds, for sampling and PPO.
    python scripts/make_demo_data.py
"""
import json
import random

rng = random.Random(1234)
WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "rain", "fish", "star", "milk", "road", "bird"]
COLOURS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a plum": "purple"}


def example():
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(25), rng.randrange(25)
        return f"What is {a} plus {b}?", f" {a} plus {b} is {a + b}."
    if kind == 1:
        n = rng.randrange(1, 300)
        return f"What number comes after {n}?", f" The number after {n} is {n + 1}."
    if kind == 2:
        w = rng.choice(WORDS)
        return f"Spell {w} backwards.", f" {w} backwards is {w[::-1]}."
    thing = rng.choice(sorted(COLOURS))
    return f"What colour is {thing}?", f" {thing[0].upper() + thing[1:]} is {COLOURS[thing]}."


demos = [example() for _ in range(400)]
with open("datasets/demo/demonstrations.jsonl", "w") as f:
    for p, r in demos:
        f.write(json.dumps({"prompt": p, "response": r}) + "\n")
with open("datasets/demo/prompts.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"prompt": example()[0]}) + "\n")
print("wrote", len(demos), "demonstrations and 64 prompts")
