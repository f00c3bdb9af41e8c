"""tests/mutations.py stays usable: every planted bug still applies to today's source (a refactor that moves the
guarded code must move its mutant too, or the mutation report would stop covering that bug class)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutations  # noqa: E402

sys.path.pop(0)


def test_every_mutant_applies_exactly_once_and_changes_the_source():
    root = Path(__file__).resolve().parents[1]
    for m in mutations.MUTANTS:
        text = (root / m.path).read_text()
        assert text.count(m.old) == 1, f"mutant {m.name!r}: {m.path} holds its original {text.count(m.old)} times"
        assert m.old != m.new and m.tests, m.name
    assert len({m.name for m in mutations.MUTANTS}) == len(mutations.MUTANTS)
