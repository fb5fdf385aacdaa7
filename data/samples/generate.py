#!/usr/bin/env python3
"""Writes the small sample corpora the shipped pipelines read (data/samples/*).

Everything is invented here from templates and a fixed seed, so the files are original,
byte-identical on every run, and small enough to commit (~200 KB in all):

- wiki/chunks.jsonl   encyclopedia-style chunks, {"text", "url"} rows (wiki-finetune)
- notes/*.md          a folder of markdown notes (pretrain-sft)
- dialogues.txt       dialogues separated by "<dialogue>" lines (pretrain-sft)
- chat.jsonl          chat conversations, {"messages": [...]} rows (pretrain-sft)
- tools.jsonl         chat conversations with OpenAI-style tool calls (lora-export)

Run: python3 data/samples/generate.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
rng = random.Random(20261201)

ISLANDS = ["Maren", "Tolvey", "Skerra", "Ondhal", "Brisk", "Quellin", "Varro", "Ithen",
           "Palloway", "Corrin", "Dunmere", "Elsket"]
PRODUCE = ["kelp", "salt", "wool", "apples", "slate", "peat", "amber", "herring", "barley",
           "flax", "honey", "clay"]
WEATHER = ["fog", "gales", "drizzle", "clear skies", "sea mist", "squalls"]
BIRDS = ["puffins", "terns", "gannets", "shags", "eiders", "skuas"]
CRAFTS = ["boat building", "net mending", "weaving", "stone carving", "rope making",
          "smoking fish"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def island_facts(name):
    r = random.Random(name)
    return {
        "name": name,
        "people": r.randrange(40, 4000),
        "peak": r.randrange(30, 600),
        "produce": r.choice(PRODUCE),
        "bird": r.choice(BIRDS),
        "craft": r.choice(CRAFTS),
        "ferry": r.choice(MONTHS),
        "neighbour": r.choice([n for n in ISLANDS if n != name]),
    }


FACTS = [island_facts(name) for name in ISLANDS]

WIKI_SENTENCES = [
    "{name} is an island of the outer archipelago with about {people} inhabitants.",
    "The highest point of {name} rises {peak} metres above the sea.",
    "Most families on {name} live from {produce}, which is shipped to the mainland.",
    "Colonies of {bird} nest on the cliffs of {name} every summer.",
    "The island is known for {craft}, a skill taught in its small school.",
    "The ferry to {name} runs daily from {ferry} until the autumn storms.",
    "From the harbour of {name} one can see {neighbour} on a clear day.",
    "Winters on {name} bring long spells of {weather}, and the harbour often closes.",
    "A chapel of grey stone stands above the harbour of {name}.",
    "Visitors to {name} are asked to keep to the paths during the nesting season.",
]


def wiki_chunks():
    rows = []
    for fact in FACTS:
        for section in range(12):
            sentences = rng.sample(WIKI_SENTENCES, 4)
            text = " ".join(
                s.format(weather=rng.choice(WEATHER), **fact) for s in sentences
            )
            rows.append({
                "text": text,
                "url": f"https://wiki.example/{fact['name']}#{section}",
            })
    rng.shuffle(rows)
    return rows


def notes():
    files = {}
    for fact in FACTS:
        days = sorted(rng.sample(range(1, 29), 3))
        month = rng.choice(MONTHS)
        lines = [f"# Field notes: {fact['name']}", ""]
        for day in days:
            lines += [
                f"## {day} {month}",
                "",
                f"- Weather: {rng.choice(WEATHER)}; wind from the {rng.choice(['north', 'south', 'east', 'west'])}.",
                f"- Counted {rng.randrange(5, 300)} {fact['bird']} on the east cliffs.",
                f"- Talked to a neighbour about {fact['craft']} and the price of {fact['produce']}.",
                "",
            ]
        lines += ["## To do", "", f"- Book the ferry to {fact['neighbour']}.",
                  "- Copy these notes before the boat leaves.", ""]
        files[f"{fact['name'].lower()}.md"] = "\n".join(lines)
    return files


def dialogues():
    blocks = []
    for _ in range(120):
        fact = rng.choice(FACTS)
        blocks.append("\n".join([
            f"Visitor: Is the ferry to {fact['name']} running today?",
            f"Harbour master: It is, but expect {rng.choice(WEATHER)} in the afternoon.",
            f"Visitor: What should I see on {fact['name']}?",
            f"Harbour master: The {fact['bird']} on the cliffs, and ask about {fact['craft']}.",
        ]))
    return "\n\n<dialogue>\n\n".join(blocks) + "\n"


QUESTIONS = [
    ("How many people live on {name}?", "About {people} people live on {name}."),
    ("What is the highest point of {name}?", "The highest point of {name} is {peak} metres."),
    ("What does {name} produce?", "{name} lives mostly from {produce}."),
    ("Which birds nest on {name}?", "{bird} nest on the cliffs of {name}."),
    ("What craft is {name} known for?", "{name} is known for {craft}."),
    ("Which island can you see from {name}?", "On a clear day you can see {neighbour}."),
]


def chats():
    rows = []
    for _ in range(300):
        fact = rng.choice(FACTS)
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You answer questions about the outer archipelago."})
        for question, answer in rng.sample(QUESTIONS, rng.choice([1, 1, 2])):
            messages.append({"role": "user", "content": question.format(**fact)})
            answer = answer.format(**fact)
            messages.append({"role": "assistant", "content": answer[0].upper() + answer[1:]})
        rows.append({"messages": messages})
    return rows


def tools():
    rows = []
    for index in range(240):
        fact = rng.choice(FACTS)
        call_id = f"call_{index}"
        kind = rng.choice(["weather", "ferry", "convert"])
        if kind == "weather":
            user = f"What's the weather on {fact['name']} tomorrow?"
            call = {"name": "get_forecast", "arguments": {"island": fact["name"], "days": 1}}
            result = {"forecast": rng.choice(WEATHER), "wind_knots": rng.randrange(3, 45)}
            answer = f"Tomorrow on {fact['name']}: {result['forecast']}, wind {result['wind_knots']} knots."
        elif kind == "ferry":
            day = rng.randrange(1, 29)
            month = rng.choice(MONTHS)
            user = f"Book me a ferry seat to {fact['name']} on {day} {month}."
            call = {"name": "book_ferry", "arguments": {"island": fact["name"], "date": f"{day} {month}", "seats": 1}}
            result = {"booking": f"F{rng.randrange(1000, 9999)}", "departs": f"{rng.randrange(6, 18):02d}:{rng.choice(['00', '15', '30', '45'])}"}
            answer = f"Booked: seat {result['booking']}, departing at {result['departs']}."
        else:
            metres = fact["peak"]
            user = f"How many feet is the highest point of {fact['name']}?"
            call = {"name": "convert_units", "arguments": {"value": metres, "from": "m", "to": "ft"}}
            result = {"value": round(metres * 3.28084, 1)}
            answer = f"{metres} metres is about {result['value']} feet."
        rows.append({"messages": [
            {"role": "system", "content": "You can call tools: get_forecast, book_ferry, convert_units."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
            {"role": "assistant", "content": answer},
        ]})
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main():
    write_jsonl(OUT / "wiki" / "chunks.jsonl", wiki_chunks())
    notes_dir = OUT / "notes"
    notes_dir.mkdir(parents=True, exist_ok=True)
    for name, text in notes().items():
        (notes_dir / name).write_text(text)
    (OUT / "dialogues.txt").write_text(dialogues())
    write_jsonl(OUT / "chat.jsonl", chats())
    write_jsonl(OUT / "tools.jsonl", tools())


if __name__ == "__main__":
    main()
