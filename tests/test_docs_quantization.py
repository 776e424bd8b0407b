"""docs/quantization.md's example runs as written and prints what the page says it prints."""

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "quantization.md"


def test_quantization_page_example_runs_and_matches_its_output(capsys):
    text = PAGE.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"It prints.*?```\n(.*?)```", text, re.S).group(1)
    exec(compile(code, str(PAGE), "exec"), {"__name__": "docs_quantization"})
    out = capsys.readouterr().out
    got, want = out.split(), shown.split()
    assert len(got) == len(want), (out, shown)
    for g, w in zip(got, want, strict=True):  # words equal, numbers within float round-off
        if re.fullmatch(r"[0-9.]+", w):
            assert abs(float(g) - float(w)) <= 2e-4 + 1e-3 * float(w), (out, shown)
        else:
            assert g == w, (out, shown)
    errors = {line.rsplit(None, 1)[0]: float(line.rsplit(None, 1)[1])
              for line in out.splitlines()[:4]}
    # the page's claims: joint below prune-then-RTN at int4, OBR below both
    assert errors["obr"] < errors["joint"] < errors["2:4 then rtn"]
