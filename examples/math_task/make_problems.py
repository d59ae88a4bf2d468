"""Writes problems.jsonl (columns: prompt, answer): 30 short word problems written for lmpo.
Each answer is computed here from the numbers in the problem, not typed by hand."""

import json
import os
from fractions import Fraction

HERE = os.path.dirname(os.path.abspath(__file__))
SUFFIX = " Think step by step, then give the final answer as \\boxed{...}."

PROBLEMS = [
    ("Mia has 12 marbles and buys 3 bags of 8 marbles each. How many marbles does she have now?", 12 + 3 * 8),
    ("A train travels 180 km in 2 hours. What is its average speed in km per hour?", 180 // 2),
    ("A shirt costs $40 and is on sale for 25% off. What is the sale price in dollars?", 40 * 3 // 4),
    ("Tom reads 15 pages a day. How many days does he need to read a 225-page book?", 225 // 15),
    ("A rectangle is 9 cm long and 4 cm wide. What is its area in square centimeters?", 9 * 4),
    ("There are 5 boxes with 24 pencils each. The pencils are shared equally by 8 students. How many pencils does each student get?", 5 * 24 // 8),
    ("Sara saves $7 every week. How many dollars has she saved after one year of 52 weeks?", 7 * 52),
    ("A pizza is cut into 8 equal slices. Ana eats 3 slices. What fraction of the pizza is left?", Fraction(5, 8)),
    ("The temperature was -4 degrees in the morning and rose by 11 degrees by noon. What was the temperature at noon?", -4 + 11),
    ("A farmer has 17 cows and 23 chickens. How many legs do the animals have in total?", 17 * 4 + 23 * 2),
    ("A water tank holds 600 liters and is 35% full. How many liters of water are in it?", 600 * 35 // 100),
    ("What is the sum of the whole numbers from 1 to 50?", sum(range(1, 51))),
    ("A car uses 6 liters of fuel per 100 km. How many liters does it use for 350 km?", Fraction(6 * 350, 100)),
    ("Leo is 3 times as old as his sister. The sum of their ages is 32. How old is Leo?", 24),
    ("A store sells pens in packs of 6 for $4. How many dollars do 30 pens cost?", 30 // 6 * 4),
    ("The average of four numbers is 15. Three of them are 10, 12 and 20. What is the fourth number?", 4 * 15 - 10 - 12 - 20),
    ("A recipe needs 3/4 cup of sugar per batch. How many cups of sugar are needed for 6 batches?", Fraction(3, 4) * 6),
    ("A square has a perimeter of 36 m. What is its area in square meters?", (36 // 4) ** 2),
    ("Ben had $150. He spent 1/3 of it on a jacket and then $20 on lunch. How many dollars does he have left?", 150 - 50 - 20),
    ("A bus leaves at 8:45 and arrives at 11:10 the same morning. How many minutes is the trip?", (11 * 60 + 10) - (8 * 60 + 45)),
    ("A class has 28 students; 4/7 of them are girls. How many boys are in the class?", 28 - 28 * 4 // 7),
    ("If 5 workers build a wall in 12 days, how many days do 6 workers need at the same rate?", 5 * 12 // 6),
    ("A number doubled and then increased by 7 equals 31. What is the number?", (31 - 7) // 2),
    ("A phone costs $480 after a 20% discount. What was the original price in dollars?", 480 * 100 // 80),
    ("Each of 3 friends pays an equal share of a $57 bill. How many dollars does each pay?", 57 // 3),
    ("A cube has edges of length 5 cm. What is its volume in cubic centimeters?", 5 ** 3),
    ("A runner does 4 laps of a 400 m track and then 1.5 km more. How many meters does she run in total?", 4 * 400 + 1500),
    ("The price of a book rose from $20 to $23. By what percent did the price rise?", (23 - 20) * 100 // 20),
    ("What is the least common multiple of 12 and 18?", 36),
    ("A garden has 7 rows of 13 tulips, and 19 tulips are picked. How many tulips remain?", 7 * 13 - 19),
]


def fmt(x):
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else "%d/%d" % (x.numerator, x.denominator)
    return str(x)


def main():
    assert len(PROBLEMS) == 30
    with open(os.path.join(HERE, "problems.jsonl"), "w") as f:
        for question, answer in PROBLEMS:
            f.write(json.dumps({"prompt": question + SUFFIX, "answer": fmt(answer)}) + "\n")
    print("wrote %d problems" % len(PROBLEMS))


if __name__ == "__main__":
    main()
