"""Offline needle-in-a-haystack prompts (RULER style) from text that ships with Python.

The haystack is CPython's `pydoc_data.topics` (about 465k characters of English documentation, always installed)
or RULER's repeated "noise" sentences; a needle sentence is placed at a chosen depth, and the question asks for it.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
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
  hay = source[start : start + chars]
  city, number = rng.choice(CITIES), str(rng.randrange(1000000, 9999999))
  needle = f" The special magic number for {city} is {number}. "
  cut = int(len(hay) * depth)
  cut = hay.rfind(" ", 0, cut) + 1 if " " in hay[:cut] else cut  # between words
  text = (
    f"Read the text below and answer the question after it.\n\n{hay[:cut]}{needle}{hay[cut:]}\n\n"
    f"Question: What is the special magic number for {city}? Answer with the number only."
  )
  return NeedlePrompt(text=text, answer=number, depth=depth)


# ---------------------------------------------------------------------------------------------------------------------
# RULER-style synthetic tasks (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
# Models?"), generated offline and seeded: single needle, multi-key, multi-value and variable tracking, in RULER's
# noise haystack or in real prose. Scored as RULER does: the fraction of expected strings found in the answer.

TASKS = ("single", "multikey", "multivalue", "vartrack")
HAYSTACKS = ("noise", "prose")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Tokens left for the answer (the prompt fills the rest of a sample's length); RULER's budgets are similar.
MAX_NEW_TOKENS = {"single": 24, "multikey": 24, "multivalue": 64, "vartrack": 40}
NUM_NEEDLES = 4  # multikey: 4 keys (one asked); multivalue: 4 values of one key
NUM_HOPS = 4  # vartrack: one chain of 5 variables
KEY_WORDS = (
  "anchor",
  "badger",
  "cactus",
  "dolphin",
  "ember",
  "falcon",
  "glacier",
  "harbor",
  "iris",
  "jasmine",
  "kettle",
  "lantern",
  "meadow",
  "nectar",
  "orchid",
  "pebble",
  "quartz",
  "raven",
  "saffron",
  "thistle",
  "umbrella",
  "violet",
  "walnut",
  "yarrow",
  "zephyr",
  "amber",
  "bramble",
  "cobalt",
  "dune",
  "estuary",
  "fjord",
  "garnet",
  "heron",
  "indigo",
  "juniper",
  "kelp",
  "lichen",
  "marble",
  "nutmeg",
  "oyster",
  "parsley",
  "quill",
  "reef",
  "sparrow",
  "tundra",
  "upland",
  "vessel",
  "willow",
  "yeast",
  "zinnia",
  "acorn",
  "beacon",
  "canyon",
  "drizzle",
  "elm",
  "ferret",
  "gravel",
  "hazel",
  "ivory",
  "jigsaw",
  "kiosk",
  "lemon",
  "mosaic",
  "nickel",
)


@dataclasses.dataclass(frozen=True)
class TaskSample:
  """One prompt of a RULER-style task.

  The model input is the chat template around `context` (the user message) followed by `answer_prefix` (the start
  of the assistant's answer, as RULER appends it), and the answer gets `max_new_tokens` tokens.
  """

  id: str
  task: str
  haystack: str
  length: int  # target tokens: prompt plus answer budget (the prompt is fitted to length - max_new_tokens)
  depth: float  # where the asked needle (multi-value: the first value; vartrack: the chain's start) sits
  context: str
  answer_prefix: str
  answers: tuple[str, ...]
  max_new_tokens: int


def string_match_all(prediction: str, answers) -> float:
  """RULER's score: the fraction of expected strings that occur in the prediction (case-insensitive)."""
  answers = list(answers)
  if not answers:
    raise ValueError("answers must not be empty")
  text = prediction.lower()
  return sum(a.lower() in text for a in answers) / len(answers)


def _boundary(hay: str, pos: int) -> int:
  """An insertion point at or before pos: after a sentence end or newline when one is near, else after a space."""
  pos = max(0, min(pos, len(hay)))
  sentence = max(hay.rfind(". ", 0, pos), hay.rfind("\n", 0, pos))
  if sentence >= 0 and pos - sentence < 400:
    return sentence + 1
  space = hay.rfind(" ", 0, pos)
  return space + 1 if space >= 0 else pos


def _insert(hay: str, items) -> str:
  """items: (depth, sentence) in the order they must appear; depths are made non-decreasing in that order."""
  out, last, prev_depth = [], 0, 0.0
  for depth, sentence in items:
    prev_depth = max(prev_depth, depth)
    cut = max(last, _boundary(hay, int(len(hay) * prev_depth)))
    out += [hay[last:cut], sentence]
    last = cut
  out.append(hay[last:])
  return "".join(out)


def _sample_seed(*parts) -> int:
  return zlib.crc32("/".join(str(p) for p in parts).encode())


def _task_parts(task: str, rng: random.Random, depth: float):
  """(needles as (depth, sentence) in text order, question, answer prefix, expected answers)."""
  values = [str(v) for v in rng.sample(range(1000000, 10000000), NUM_NEEDLES)]
  keys = rng.sample(KEY_WORDS, NUM_NEEDLES)
  needle = " One of the special magic numbers for {} is: {}. "
  intro = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the numbers afterwards.\n\n"
  )
  if task == "single":
    items = [(depth, needle.format(keys[0], values[0]))]
    return (
      intro,
      items,
      f"What is the special magic number for {keys[0]} mentioned in the provided text?",
      f"The special magic number for {keys[0]} mentioned in the provided text is",
      (values[0],),
    )
  if task == "multikey":  # the asked key at `depth`, the others anywhere
    placed = [(depth, needle.format(keys[0], values[0]))]
    placed += [(rng.random(), needle.format(k, v)) for k, v in zip(keys[1:], values[1:])]
    items = sorted(placed, key=lambda x: x[0])
    return (
      intro,
      items,
      f"What is the special magic number for {keys[0]} mentioned in the provided text?",
      f"The special magic number for {keys[0]} mentioned in the provided text is",
      (values[0],),
    )
  if task == "multivalue":  # one key, several values: the first at `depth`, the others anywhere
    depths = [depth] + [rng.random() for _ in values[1:]]
    items = sorted(((d, needle.format(keys[0], v)) for d, v in zip(depths, values)), key=lambda x: x[0])
    return (
      intro,
      items,
      f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?",
      f"The special magic numbers for {keys[0]} mentioned in the provided text are",
      tuple(values),
    )
  if task == "vartrack":  # VAR X1 = v, VAR X2 = VAR X1, ...: the chain starts at `depth`, later hops follow it
    names = []
    while len(names) < NUM_HOPS + 1:
      name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
      if name not in names:
        names.append(name)
    depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(NUM_HOPS))
    sentences = [f" VAR {names[0]} = {values[0]}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    return (
      "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
      list(zip(depths, sentences)),
      f"Question: Find all variables that are assigned the value {values[0]} in the text above.",
      f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
      f"are assigned the value {values[0]}, they are:",
      tuple(names),
    )
  raise ValueError(f"task={task!r} must be one of {TASKS}")


def ruler_sample(
  task: str,
  *,
  haystack: str,
  length: int,
  index: int,
  count_tokens,
  depth: float | None = None,
  seed: int = 0,
  max_new_tokens: int | None = None,
) -> TaskSample:
  """Sample `index` of a RULER-style task, fitted to `length` tokens (prompt + answer budget).

  Args:
    task: one of TASKS.
    haystack: "noise" (RULER's repeated sentences) or "prose" (CPython's pydoc_data.topics).
    length: target tokens; the prompt gets length - max_new_tokens tokens at most (within ~3% below that).
    index: sample number; the sample is a pure function of (task, haystack, length, index, seed).
    count_tokens: callable TaskSample -> the prompt's token count as the model will see it (chat template and
      answer prefix included).
    depth: where the asked needle goes (fraction of the haystack); default DEPTHS[index % len(DEPTHS)].
    seed: base seed.
    max_new_tokens: the answer budget; default MAX_NEW_TOKENS[task].
  """
  if haystack not in HAYSTACKS:
    raise ValueError(f"haystack={haystack!r} must be one of {HAYSTACKS}")
  depth = DEPTHS[index % len(DEPTHS)] if depth is None else float(depth)
  if not 0 <= depth <= 1:
    raise ValueError(f"{depth=} must lie in [0, 1]")
  max_new = MAX_NEW_TOKENS[task] if max_new_tokens is None and task in MAX_NEW_TOKENS else max_new_tokens
  budget = length - (max_new or 0)
  sample_id = f"{task}-{haystack}-{length}-{index}"
  base = _sample_seed(sample_id, seed)
  source = prose() if haystack == "prose" else None
  start_fraction = random.Random(base).random()

  def build(n_chars: int) -> TaskSample:
    rng = random.Random(base + 1)  # the same needles whatever the haystack size
    intro, items, question, prefix, answers = _task_parts(task, rng, depth)
    if source is None:
      hay = (NOISE * (n_chars // len(NOISE) + 1))[:n_chars]
    else:
      start = int(start_fraction * max(0, len(source) - n_chars))
      hay = source[start : start + n_chars]
    context = f"{intro}{_insert(hay, items)}\n\n{question}"
    return TaskSample(
      id=sample_id,
      task=task,
      haystack=haystack,
      length=length,
      depth=depth,
      context=context,
      answer_prefix=prefix,
      answers=answers,
      max_new_tokens=max_new,
    )

  if budget <= count_tokens(build(0)):
    raise ValueError(f"{length=} leaves no room for a haystack in {task} (answer budget {max_new})")
  n_chars, best = budget * 3, None
  for _ in range(12):  # rescale the haystack by the measured characters per token until the prompt fits snugly
    sample = build(n_chars)
    tokens = count_tokens(sample)
    if tokens <= budget:
      best = sample
      if tokens >= 0.97 * budget:
        break
    n_chars = max(1, int(n_chars * 0.985 * budget / max(tokens, 1)))
  return best if best is not None else build(0)
