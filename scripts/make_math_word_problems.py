"""Write src/gradus/data/math_word_problems.jsonl: grade-school word problems with exact answers.

Each template draws its numbers from a seeded RNG and computes the answer with Fraction, so answers are
exact; the solution text works the steps and ends in \\boxed{answer}. Run from the repository root:
``python scripts/make_math_word_problems.py`` (deterministic: re-running writes the same file).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Ema", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Leo"]


def fmt(x: Fraction) -> str:
    """Answer text: '12', '-3', '3/4'."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def latex(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"


Problem = tuple[str, Fraction, str]


def apples(r: random.Random) -> Problem:
    n, a, b = r.choice(NAMES), r.randint(10, 40), r.randint(2, 9)
    c = r.randint(1, a - b)
    x = Fraction(a + b - c)
    return (
        f"{n} has {a} apples, buys {b} more and gives {c} to a friend. How many apples does {n} have now?",
        x,
        f"{a} + {b} - {c} = {fmt(x)}.",
    )


def boxes(r: random.Random) -> Problem:
    k, m = r.randint(3, 12), r.randint(4, 15)
    x = Fraction(k * m)
    return (
        f"A shop has {k} boxes with {m} pencils in each box. How many pencils are there in all?",
        x,
        f"{k} \\times {m} = {fmt(x)}.",
    )


def share(r: random.Random) -> Problem:
    people, each = r.randint(3, 9), r.randint(3, 12)
    total = people * each
    x = Fraction(each)
    return (
        f"{total} stickers are shared equally among {people} children. "
        "How many stickers does each child get?",
        x,
        f"{total} \\div {people} = {fmt(x)}.",
    )


def pizza(r: random.Random) -> Problem:
    slices = r.choice([6, 8, 10, 12])
    eaten = r.randint(1, slices - 1)
    x = Fraction(slices - eaten, slices)
    return (
        f"A pizza is cut into {slices} equal slices and {eaten} slices are eaten. "
        "What fraction of the pizza is left?",
        x,
        f"{slices - eaten} of {slices} slices remain: \\frac{{{slices - eaten}}}{{{slices}}} = {latex(x)}.",
    )


def speed(r: random.Random) -> Problem:
    v, t = r.randint(30, 90), r.randint(2, 6)
    x = Fraction(v * t)
    return (
        f"A train travels at {v} km per hour for {t} hours. How many kilometres does it travel?",
        x,
        f"{v} \\times {t} = {fmt(x)}.",
    )


def change(r: random.Random) -> Problem:
    price, qty = r.randint(2, 9), r.randint(2, 6)
    paid = (price * qty // 10 + 1) * 10
    x = Fraction(paid - price * qty)
    return (
        f"Notebooks cost {price} dollars each. {r.choice(NAMES)} buys {qty} notebooks and pays with {paid} "
        "dollars. How many dollars of change are given back?",
        x,
        f"Cost {price} \\times {qty} = {price * qty}; change {paid} - {price * qty} = {fmt(x)}.",
    )


def half_price(r: random.Random) -> Problem:
    p = r.randint(5, 49)
    x = Fraction(p, 2)
    return (
        f"A toy costs {p} dollars. It is on sale for half price. What is the sale price in dollars?",
        x,
        f"{p} \\div 2 = {latex(x)}.",
    )


def ages(r: random.Random) -> Problem:
    a, d, y = r.randint(5, 15), r.randint(2, 30), r.randint(2, 10)
    x = Fraction(a + d + y)
    return (
        f"Mia is {a} years old. Her aunt is {d} years older than Mia. How old will the aunt be in {y} years?",
        x,
        f"Aunt now: {a} + {d} = {a + d}; in {y} years: {a + d} + {y} = {fmt(x)}.",
    )


def rectangle(r: random.Random) -> Problem:
    w, h = r.randint(2, 20), r.randint(2, 20)
    x = Fraction(2 * (w + h))
    return (
        f"A rectangle is {w} cm wide and {h} cm long. What is its perimeter in cm?",
        x,
        f"2 \\times ({w} + {h}) = {fmt(x)}.",
    )


def area(r: random.Random) -> Problem:
    w, h = r.randint(2, 20), r.randint(2, 20)
    x = Fraction(w * h)
    return (
        f"A garden is {w} m by {h} m. What is its area in square metres?",
        x,
        f"{w} \\times {h} = {fmt(x)}.",
    )


def percent(r: random.Random) -> Problem:
    total, pct = r.choice([20, 40, 50, 80, 120, 200]), r.choice([10, 25, 50, 75])
    x = Fraction(total * pct, 100)
    return (
        f"A class has {total} students and {pct}% of them walk to school. How many students walk to school?",
        x,
        f"{total} \\times {pct} / 100 = {latex(x)}.",
    )


def average(r: random.Random) -> Problem:
    scores = [r.randint(50, 100) for _ in range(r.choice([3, 4]))]
    x = Fraction(sum(scores), len(scores))
    listing = ", ".join(map(str, scores))
    return (
        f"The test scores were {listing}. What is the average score?",
        x,
        f"Sum {sum(scores)}, divided by {len(scores)}: {latex(x)}.",
    )


def temperature(r: random.Random) -> Problem:
    start, drop = r.randint(1, 10), r.randint(5, 20)
    x = Fraction(start - drop)
    return (
        f"The temperature was {start} degrees in the evening and fell by {drop} degrees overnight. "
        "What was the temperature in the morning?",
        x,
        f"{start} - {drop} = {fmt(x)}.",
    )


def recipe(r: random.Random) -> Problem:
    cups, serves, want = r.choice([1, 2, 3]), r.choice([2, 4, 6]), r.choice([3, 5, 8, 9])
    x = Fraction(cups * want, serves)
    return (
        f"A recipe uses {cups} cups of flour for {serves} people. "
        f"How many cups of flour are needed for {want} people?",
        x,
        f"{cups} \\times {want} / {serves} = {latex(x)}.",
    )


def savings(r: random.Random) -> Problem:
    goal, weekly = r.randint(40, 150), r.randint(5, 15)
    saved = r.randint(0, 20)
    weeks = -(-(goal - saved) // weekly)
    x = Fraction(weeks)
    return (
        f"{r.choice(NAMES)} has {saved} dollars and saves {weekly} dollars every week. "
        f"How many whole weeks until there are at least {goal} dollars?",
        x,
        f"Needs {goal - saved} more; {goal - saved} / {weekly} rounded up is {fmt(x)}.",
    )


def legs(r: random.Random) -> Problem:
    hens, cows = r.randint(2, 12), r.randint(2, 12)
    x = Fraction(2 * hens + 4 * cows)
    return (
        f"A farm has {hens} hens and {cows} cows. How many legs do they have altogether?",
        x,
        f"2 \\times {hens} + 4 \\times {cows} = {fmt(x)}.",
    )


def minutes(r: random.Random) -> Problem:
    h, m = r.randint(1, 4), r.choice([10, 15, 20, 30, 45])
    x = Fraction(60 * h + m)
    return (
        f"A film lasts {h} hours and {m} minutes. How long is it in minutes?",
        x,
        f"60 \\times {h} + {m} = {fmt(x)}.",
    )


def marbles_ratio(r: random.Random) -> Problem:
    red, blue = r.randint(1, 5), r.randint(1, 5)
    k = r.randint(2, 8)
    total = (red + blue) * k
    x = Fraction(red * k)
    return (
        f"A bag has {total} marbles, red and blue in the ratio {red}:{blue}. How many red marbles are there?",
        x,
        f"{total} / ({red} + {blue}) = {k}; {red} \\times {k} = {fmt(x)}.",
    )


def fuel(r: random.Random) -> Problem:
    litres, per100 = r.randint(20, 60), r.choice([4, 5, 8, 10])
    x = Fraction(litres * 100, per100)
    return (
        f"A car uses {per100} litres of fuel per 100 km. How far can it go on {litres} litres, in km?",
        x,
        f"{litres} / {per100} \\times 100 = {latex(x)}.",
    )


def reading(r: random.Random) -> Problem:
    pages, per_day, days = r.randint(120, 400), r.randint(10, 30), r.randint(2, 5)
    x = Fraction(pages - per_day * days)
    return (
        f"A book has {pages} pages. Leo reads {per_day} pages a day for {days} days. "
        "How many pages are left?",
        x,
        f"{pages} - {per_day} \\times {days} = {fmt(x)}.",
    )


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    apples,
    boxes,
    share,
    pizza,
    speed,
    change,
    half_price,
    ages,
    rectangle,
    area,
    percent,
    average,
    temperature,
    recipe,
    savings,
    legs,
    minutes,
    marbles_ratio,
    fuel,
    reading,
]


def main(out: Path = Path("src/gradus/data/math_word_problems.jsonl"), per_template: int = 4) -> None:
    rng = random.Random(20240607)
    seen: set[str] = set()
    rows = []
    for template in TEMPLATES:
        made = 0
        while made < per_template:
            question, answer, steps = template(rng)
            if question in seen:
                continue
            seen.add(question)
            made += 1
            rows.append(
                {
                    "question": question,
                    "answer": fmt(answer),
                    "solution": f"{steps} The answer is \\boxed{{{latex(answer)}}}.",
                }
            )
    out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} problems to {out}")


if __name__ == "__main__":
    main()
