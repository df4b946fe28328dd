"""The demo's planted fact: where it goes and what it leaves alone."""

from pipelines.main_job import DEMO_ANSWER, DEMO_FACT, DEMO_QUESTION, plant_fact


def test_the_fact_goes_after_a_sentence_past_the_middle_and_the_text_is_otherwise_unchanged(austen_text):
    planted = plant_fact(austen_text)
    at = planted.index(DEMO_FACT)
    assert planted[:at] + planted[at + len(DEMO_FACT):] == austen_text
    assert len(austen_text) // 2 <= at < len(austen_text) // 2 + 2000 and planted[at - 1] == "."
    assert DEMO_ANSWER in DEMO_FACT and DEMO_ANSWER not in austen_text and DEMO_ANSWER not in DEMO_QUESTION
    assert DEMO_FACT.strip().startswith(DEMO_QUESTION)  # the question restates the fact up to its answer
    assert plant_fact("No sentence end here") == "No sentence end here" + DEMO_FACT  # no boundary: at the end
