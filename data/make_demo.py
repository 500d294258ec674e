"""Generate the demo datasets.

demo_train/demo_test (prompt/completion): free-text assistant requests -> fixed JSON records.
demo_chat_train/demo_chat_test (chat messages): a JSON record -> a one-line confirmation, with a system turn.
demo_tools_train/demo_tools_test (chat messages with tools): a request -> a call of one of three functions; some
training rows go on with the function's result and the assistant's answer.
demo_dates_train (prompt/completion): a date as people write it -> YYYY-MM-DD, the supervised stage before
demo_pref_train/demo_pref_test (prompt/chosen/rejected): the same task as preference pairs, the rejected answer a
plausible mistake (day and month swapped, a field off by one).

A tiny instruct model gets both formats wrong out of the box but learns them from a few
hundred LoRA steps on a CPU, which makes them a quick, visible fine-tuning demo.
"""

import argparse
import json
import random
from pathlib import Path

SEED = 1234
PROMPT = "Convert the request into a JSON record.\nRequest: {}\nJSON:"
# Test rows use slot values never seen in training this often, to check copying
# generalises instead of being memorised.
TEST_HOLDOUT_P = 0.4

RESTAURANTS = [
    "Luigi's", "The Golden Spoon", "Sakura", "Blue Door Bistro", "Casa Lola",
    "The Olive Tree", "Noodle House", "Chez Marie", "Red Lantern", "Harbor Grill",
    "Taco Loco", "The Green Fork", "Bella Napoli", "Spice Route", "Smoke and Oak",
    "Le Petit Cafe", "Mama Rosa's", "Ocean Prime", "The Corner Table", "Pho 88",
    "Kyoto Garden", "El Toro", "The Brass Pig", "Saffron", "Burger Barn",
    "Trattoria Roma", "Little India", "The Salt Cellar", "Dim Sum Palace", "Fig and Vine",
]
HOLDOUT_RESTAURANTS = [
    "Osteria Bruno", "The Velvet Crab", "Mint Leaf", "Pablo's Cantina",
    "Silver Birch", "Wok This Way", "Nonna's Kitchen", "The Copper Kettle",
]

CITIES = [
    "Boston", "Denver", "Chicago", "Seattle", "Miami", "Atlanta", "Dallas", "Houston",
    "Phoenix", "Portland", "New York", "Los Angeles", "San Francisco", "Las Vegas",
    "Orlando", "Austin", "Nashville", "Detroit", "Minneapolis", "Philadelphia",
    "San Diego", "Salt Lake City", "Toronto", "Vancouver", "London", "Paris",
    "Madrid", "Rome", "Berlin", "Dublin",
]
HOLDOUT_CITIES = [
    "Pittsburgh", "Albuquerque", "Raleigh", "Tampa", "Montreal",
    "Lisbon", "Oslo", "Kansas City",
]

TASKS = [
    "call mom", "pay the rent", "take my medicine", "water the plants",
    "buy milk", "walk the dog", "send the report", "book a dentist appointment",
    "pick up the kids", "renew my passport", "call the bank", "feed the cat",
    "submit my timesheet", "email Sarah", "check the oven", "go to the gym",
    "pick up the dry cleaning", "charge my phone", "call the plumber",
    "pay the electricity bill", "buy flowers", "take out the trash",
    "return the library books", "start the laundry", "call grandpa",
    "book the car service", "order more coffee", "review the slides",
]
HOLDOUT_TASKS = [
    "cancel the gym membership", "text Jordan", "defrost the chicken",
    "print the boarding pass", "call the vet", "buy a birthday card",
]

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july",
          "august", "september", "october", "november", "december"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine", "ten", "eleven", "twelve"]

# Imperative templates accept a "can you"/"please" wrapper; the others already read
# as statements or fragments and would turn ungrammatical with one.
RESTAURANT_TEMPLATES = [
    ("book a table for {people} at {name} {day} {time}", True),
    ("reserve a table at {name} for {people} {day} {time}", True),
    ("get us a table at {name} {day} {time}, party of {n}", True),
    ("book {name} {day} {time} for {people}", True),
    ("make a reservation for {people} at {name} {time} {day}", True),
    ("I need a reservation at {name} for {people} {time} {day}", False),
    ("table for {people} at {name} {day} {time}", False),
    ("{day} {time}, {name}, {people}", False),
    ("could we get a table for {people} at {name} {time} {day}?", False),
    ("party of {n}, we want to eat at {name} {day} {time}", False),
    ("I'd like to book {name} for {people} {day} {time}", False),
    ("reservation for {people} at {name}, {day} {time}", False),
]
REMINDER_TEMPLATES = [
    ("remind me to {task} {day} {time}", True),
    ("set a reminder to {task} {time} {day}", True),
    ("remind me {day} {time} to {task}", True),
    ("don't let me forget to {task} {day} {time}", True),
    ("ping me {day} {time} to {task}", True),
    ("add a reminder for {day} {time} to {task}", True),
    ("create a reminder: {task}, {day} {time}", True),
    ("nudge me to {task} {time} {day}", True),
    ("{day} {time} remind me to {task}", False),
    ("I need a reminder to {task} {day} {time}", False),
    ("reminder to {task} {time} {day}", False),
    ("I have to {task} {day} {time}, remind me", False),
]
# {pax} is None where the template itself implies a single traveller.
FLIGHT_TEMPLATES = [
    ("book a flight from {src} to {dst} {date} for {pax}", True),
    ("find me a flight to {dst} from {src} {date}, {pax}", True),
    ("get {tickets} to {dst} leaving {src} {date}", True),
    ("book {tickets} {src} to {dst} {date}", True),
    ("reserve seats for {pax} on a flight {date} from {src} to {dst}", True),
    ("book me a flight {date} from {src} to {dst}", True),
    ("flight from {src} to {dst} {date} for {pax}", False),
    ("I need {tickets} from {src} to {dst} {date}", False),
    ("{src} to {dst} {date}, {pax}", False),
    ("I want to fly from {src} to {dst} {date}", False),
    ("one-way from {src} to {dst} {date} for {pax}", False),
    ("{tickets} to {dst}, departing {src} {date}", False),
]
SOLO_FLIGHT_TEMPLATES = {
    "book me a flight {date} from {src} to {dst}",
    "I want to fly from {src} to {dst} {date}",
}

POLITE_PREFIXES = ["", "", "please ", "can you ", "could you ", "hey, ", "hi, please "]
POLITE_SUFFIXES = ["", "", "", " please", ", thanks", " thank you"]


def number_text(rng, n):
    return str(n) if rng.random() < 0.5 else NUMBER_WORDS[n]


def maybe_capitalize(rng, word):
    return word.capitalize() if rng.random() < 0.5 else word


def people_phrase(rng, n):
    noun = "person" if n == 1 else rng.choice(["people", "people", "guests"])
    return rng.choice([number_text(rng, n), f"{number_text(rng, n)} {noun}"])


def passengers_phrase(rng, n):
    noun = rng.choice(["person", "passenger", "adult"]) if n == 1 else \
        rng.choice(["people", "passengers", "adults"])
    return f"{number_text(rng, n)} {noun}"


def tickets_phrase(rng, n):
    noun = rng.choice(["ticket", "seat"])
    if n == 1:
        return rng.choice([f"a {noun}", f"one {noun}", f"1 {noun}"])
    return f"{number_text(rng, n)} {noun}s"


def time_phrases(h, m):
    """Every way this corpus writes the clock time h:m."""
    h12, ampm = (h % 12 or 12), ("am" if h < 12 else "pm")
    phrases = [f"{h12}:{m:02d}{ampm}", f"{h12}:{m:02d} {ampm}", f"{h12}:{m:02d} {ampm.upper()}",
               f"{h:02d}:{m:02d}"]
    if m == 0:
        phrases += [f"{h12}{ampm}", f"{h12} {ampm}"]
    if m == 0 and h != 12:
        phrases.append(f"{h12} o'clock {ampm}")
    if m == 30:
        phrases.append(f"half past {h12} {ampm}")
    if (h, m) == (12, 0):
        phrases += ["noon", "noon", "midday"]
    part = "evening" if h >= 18 else "morning" if h < 12 else None
    if part:
        phrases.append(f"{h12}:{m:02d} in the {part}" if m else f"{h12} in the {part}")
    return phrases


def pick_time(rng, first_hour, last_hour, prepositions):
    """Return (phrase, "HH:MM") for a random quarter-hour in the range."""
    h, m = rng.randint(first_hour, last_hour), rng.choice([0, 0, 15, 30, 30, 45])
    return f"{rng.choice(prepositions)} {rng.choice(time_phrases(h, m))}", f"{h:02d}:{m:02d}"


def pick_day(rng, evening):
    """Return (phrase, normalized day); "tonight" only makes sense for evening times."""
    day = rng.choice(WEEKDAYS + ["today", "tomorrow", "tomorrow"])
    if day == "today":
        return (rng.choice(["today", "tonight"]) if evening else "today"), day
    if day == "tomorrow":
        return day, day
    return f"{rng.choice(['on ', 'this ', ''])}{maybe_capitalize(rng, day)}", day


def ordinal(d):
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def pick_date(rng):
    """Flights mostly use calendar dates, normalized to "march 3"."""
    if rng.random() < 0.25:
        return pick_day(rng, evening=False)
    month, d = rng.choice(MONTHS), rng.randint(1, 28)
    shown = maybe_capitalize(rng, month)
    short = shown[:3]
    phrase = rng.choice([f"{shown} {d}", f"{shown} {ordinal(d)}", f"{d} {shown}",
                         f"the {ordinal(d)} of {shown}", f"{short} {d}"])
    return f"{rng.choice(['on ', ''])}{phrase}", f"{month} {d}"


def pick_value(rng, common, holdout, holdout_p):
    return rng.choice(holdout if rng.random() < holdout_p else common)


def restaurant_example(rng, holdout_p):
    template, imperative = rng.choice(RESTAURANT_TEMPLATES)
    name = pick_value(rng, RESTAURANTS, HOLDOUT_RESTAURANTS, holdout_p)
    n = rng.randint(1, 12) if rng.random() < 0.3 else rng.randint(2, 6)
    time, hhmm = pick_time(rng, 11, 22, ["at", "at", "around", "for"])
    day, day_norm = pick_day(rng, evening=hhmm >= "17:00")
    text = template.format(name=name, n=number_text(rng, n), people=people_phrase(rng, n),
                           day=day, time=time)
    record = {"intent": "book_restaurant", "restaurant": name, "party_size": n,
              "day": day_norm, "time": hhmm}
    return text, imperative, record


def reminder_example(rng, holdout_p):
    template, imperative = rng.choice(REMINDER_TEMPLATES)
    task = pick_value(rng, TASKS, HOLDOUT_TASKS, holdout_p)
    time, hhmm = pick_time(rng, 6, 22, ["at"])
    day, day_norm = pick_day(rng, evening=hhmm >= "17:00")
    text = template.format(task=task, day=day, time=time)
    record = {"intent": "set_reminder", "task": task, "day": day_norm, "time": hhmm}
    return text, imperative, record


def flight_example(rng, holdout_p):
    template, imperative = rng.choice(FLIGHT_TEMPLATES)
    src = dst = pick_value(rng, CITIES, HOLDOUT_CITIES, holdout_p)
    while dst == src:
        dst = pick_value(rng, CITIES, HOLDOUT_CITIES, holdout_p)
    n = 1 if template in SOLO_FLIGHT_TEMPLATES else rng.randint(1, 6)
    date, date_norm = pick_date(rng)
    text = template.format(src=src, dst=dst, date=date, pax=passengers_phrase(rng, n),
                           tickets=tickets_phrase(rng, n))
    record = {"intent": "book_flight", "origin": src, "destination": dst,
              "date": date_norm, "passengers": n}
    return text, imperative, record


EXAMPLE_MAKERS = [restaurant_example, reminder_example, flight_example]


def polish(rng, text, imperative):
    """Add the politeness, casing and punctuation noise real users type."""
    if imperative:
        prefix = rng.choice(POLITE_PREFIXES)
        question = prefix.startswith(("can", "could"))
        suffix = "" if question or "please" in prefix else rng.choice(POLITE_SUFFIXES)
        text = prefix + text + suffix + ("?" if question else "")
    if not text.endswith("?"):
        text += rng.choice(["", "", "."])
    return text[0].upper() + text[1:] if rng.random() < 0.6 else text


def make_row(text, record):
    completion = " " + json.dumps(record, separators=(", ", ": "))
    return {"prompt": PROMPT.format(text), "completion": completion}


def make_split(rng, size, holdout_p, seen):
    """Round-robin over intents so splits stay balanced; skip any request already used."""
    rows, attempts = [], 0
    while len(rows) < size:
        attempts += 1
        if attempts > 100 * size:
            raise SystemExit(f"could not find {size} distinct requests")
        text, imperative, record = EXAMPLE_MAKERS[len(rows) % 3](rng, holdout_p)
        text = polish(rng, text, imperative)
        if text.lower() in seen or not 5 <= len(text.split()) <= 25:
            continue
        seen.add(text.lower())
        rows.append(make_row(text, record))
    return rows


SYSTEM = "You confirm bookings and reminders in one short sentence."


def confirmation(record):
    """The one sentence that confirms a record: what the chat demo teaches."""
    if record["intent"] == "book_restaurant":
        return (f"Booked a table for {record['party_size']} at {record['restaurant']}, "
                f"{record['day']} at {record['time']}.")
    if record["intent"] == "set_reminder":
        return f"Reminder set: {record['task']}, {record['day']} at {record['time']}."
    seats = "1 seat" if record["passengers"] == 1 else f"{record['passengers']} seats"
    return f"Booked {seats} from {record['origin']} to {record['destination']} on {record['date']}."


def make_chat_split(rng, size, holdout_p, seen):
    """Conversations: the system turn, a record as the user turn, its confirmation as the reply."""
    rows = []
    while len(rows) < size:
        _, _, record = EXAMPLE_MAKERS[len(rows) % 3](rng, holdout_p)
        key = json.dumps(record, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": json.dumps(record)},
                                  {"role": "assistant", "content": confirmation(record)}]})
    return rows


def function(name, description, **parameters):
    """A function schema as the chat-template API takes it; every parameter required."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": t} for k, t in parameters.items()}, "required": list(parameters)}}}


TOOLS = [function("get_weather", "Weather in a city.", city="string"),
         function("set_reminder", "Remind at a time (HH:MM).", task="string", time="string"),
         function("convert_currency", "Convert money (ISO codes).", amount="number", from_currency="string",
                  to_currency="string")]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "MXN"]
TOOL_TEMPLATES = {
    "get_weather": [("what's the weather in {city}", False), ("is it raining in {city}?", False),
                    ("tell me the weather for {city}", True), ("how warm is it in {city} right now", False),
                    ("check the weather in {city}", True), ("{city} weather", False)],
    "set_reminder": [("remind me to {task} at {time}", True), ("set a reminder at {time} to {task}", True),
                     ("at {time} remind me to {task}", False), ("I need to {task} at {time}, remind me", False),
                     ("ping me at {time} to {task}", True)],
    "convert_currency": [("convert {amount} {from_currency} to {to_currency}", True),
                         ("how much is {amount} {from_currency} in {to_currency}?", False),
                         ("{amount} {from_currency} to {to_currency}", False),
                         ("change {amount} {from_currency} into {to_currency}", True)],
}


def tool_call(rng, holdout_p):
    """(request, function name, arguments) of one request for one of the three functions."""
    name = rng.choice(list(TOOL_TEMPLATES))
    if name == "get_weather":
        arguments = {"city": pick_value(rng, CITIES, HOLDOUT_CITIES, holdout_p)}
    elif name == "set_reminder":
        arguments = {"task": pick_value(rng, TASKS, HOLDOUT_TASKS, holdout_p),
                     "time": f"{rng.randint(6, 22):02d}:{rng.choice([0, 15, 30, 45]):02d}"}
    else:
        source, target = rng.sample(CURRENCIES, 2)
        arguments = {"amount": rng.choice([5, 20, 50, 75, 100, 250, 300, 1200]) + rng.randint(0, 9),
                     "from_currency": source, "to_currency": target}
    template, imperative = rng.choice(TOOL_TEMPLATES[name])
    return polish(rng, template.format(**arguments), imperative), name, arguments


def tool_result(name, arguments):
    """What the function answers, and the assistant's sentence about it."""
    if name == "get_weather":
        return {"celsius": 18, "sky": "cloudy"}, f"It is 18 degrees and cloudy in {arguments['city']}."
    if name == "set_reminder":
        return {"ok": True}, f"I will remind you to {arguments['task']} at {arguments['time']}."
    return ({"result": round(arguments["amount"] * 1.1, 2)},
            f"{arguments['amount']} {arguments['from_currency']} is {round(arguments['amount'] * 1.1, 2)} "
            f"{arguments['to_currency']}.")


def make_tools_split(rng, size, holdout_p, seen, answered_p):
    """Rows of {tools, messages}: the request and the call; with probability answered_p, then the function's result
    and the assistant's answer. Arguments are JSON strings, as OpenAI-style logs hold them."""
    rows = []
    while len(rows) < size:
        text, name, arguments = tool_call(rng, holdout_p)
        if text.lower() in seen:
            continue
        seen.add(text.lower())
        call = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        messages = [{"role": "user", "content": text}, {"role": "assistant", "tool_calls": [call]}]
        if rng.random() < answered_p:
            result, answer = tool_result(name, arguments)
            messages += [{"role": "tool", "content": json.dumps(result)}, {"role": "assistant", "content": answer}]
        rows.append({"tools": TOOLS, "messages": messages})
    return rows


DATE_PROMPT = "Write the date as YYYY-MM-DD.\nDate: {}"


def date_example(rng, holdout_p):
    """A date as people write it, and as ISO 8601; held-out rows use years never seen in training."""
    year = rng.randint(2031, 2035) if rng.random() < holdout_p else rng.randint(1990, 2030)
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1].capitalize()
    text = rng.choice([f"{name} {ordinal(day)}, {year}", f"{day} {name} {year}", f"{name[:3]} {day}, {year}",
                       f"the {ordinal(day)} of {name}, {year}", f"{month}/{day}/{year} (US)",
                       f"{day}.{month}.{year} (Europe)"])
    return text, (year, month, day)


def wrong_date(rng, year, month, day):
    """The mistakes a model makes with dates: day and month swapped, or one of them (or the year) off by one."""
    mistakes = [(year, month, day % 28 + 1), (year, month % 12 + 1, day), (year + rng.choice([-1, 1]), month, day)]
    if day <= 12 and day != month:
        mistakes += [(year, day, month)] * 3
    return rng.choice(mistakes)


def iso(year, month, day):
    return f"{year:04d}-{month:02d}-{day:02d}"


def make_pref_split(rng, size, holdout_p, seen):
    """Preference pairs: a date to write in ISO form, the right answer chosen and a plausible mistake rejected."""
    rows = []
    while len(rows) < size:
        text, date = date_example(rng, holdout_p)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": DATE_PROMPT.format(text), "chosen": iso(*date),
                     "rejected": iso(*wrong_date(rng, *date))})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=600, help="number of training rows")
    parser.add_argument("--test", type=int, default=60, help="number of held-out test rows")
    parser.add_argument("--chat-train", type=int, default=300, help="number of chat training conversations")
    parser.add_argument("--chat-test", type=int, default=30, help="number of held-out chat conversations")
    parser.add_argument("--tools-train", type=int, default=300, help="number of tool-calling training rows")
    parser.add_argument("--tools-test", type=int, default=60, help="number of held-out tool-calling rows")
    parser.add_argument("--pref-train", type=int, default=400, help="number of preference training pairs")
    parser.add_argument("--pref-test", type=int, default=60, help="number of held-out preference pairs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder")
    args = parser.parse_args()

    rng, seen = random.Random(SEED), set()
    train = make_split(rng, args.train, 0.0, seen)
    test = make_split(rng, args.test, TEST_HOLDOUT_P, seen)
    chat_rng, chat_seen = random.Random(SEED + 1), set()  # its own stream: the prompt/completion files stay as they are
    chat_train = make_chat_split(chat_rng, args.chat_train, 0.0, chat_seen)
    chat_test = make_chat_split(chat_rng, args.chat_test, TEST_HOLDOUT_P, chat_seen)
    tools_rng, tools_seen = random.Random(SEED + 2), set()
    tools_train = make_tools_split(tools_rng, args.tools_train, 0.0, tools_seen, answered_p=0.25)
    tools_test = make_tools_split(tools_rng, args.tools_test, TEST_HOLDOUT_P, tools_seen, answered_p=0.0)
    pref_rng, pref_seen = random.Random(SEED + 3), set()
    dates_sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in make_pref_split(pref_rng, 200, 0.0,
                                                                                            pref_seen)]
    pref_train = make_pref_split(pref_rng, args.pref_train, 0.0, pref_seen)
    pref_test = make_pref_split(pref_rng, args.pref_test, TEST_HOLDOUT_P, pref_seen)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("demo_train.jsonl", train), ("demo_test.jsonl", test),
                       ("demo_chat_train.jsonl", chat_train), ("demo_chat_test.jsonl", chat_test),
                       ("demo_tools_train.jsonl", tools_train), ("demo_tools_test.jsonl", tools_test),
                       ("demo_dates_train.jsonl", dates_sft), ("demo_pref_train.jsonl", pref_train),
                       ("demo_pref_test.jsonl", pref_test)]:
        path = args.out / name
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
