"""Placeholder: the mock-llm text (replaced by the project's own once the model exists)."""

WORDS = ["the", "a", "model", "token", "stream", "answer", "of", "to", "in", "and"]


def tokens(prompt: str, count: int) -> list[str]:
    seed = sum(map(ord, prompt))
    words = [WORDS[(seed + 7 * i) % len(WORDS)] for i in range(count)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]
