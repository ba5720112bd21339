"""Chart rendering details that the pages rely on."""

from __future__ import annotations

from custos.console.charts import colour, donut_chart


def test_a_donut_slice_keeps_its_colour_when_others_are_empty():
    full = str(donut_chart("c", [("ok", 2), ("bad", 1), ("pending", 1)]))
    sparse = str(donut_chart("c", [("ok", 0), ("bad", 1), ("pending", 0)]))
    # "bad" is the second series: the same colour whether or not "ok" has devices
    assert f'stroke="{colour(1)}"' in full and f'stroke="{colour(1)}"' in sparse
    assert f'stroke="{colour(0)}"' not in sparse
    assert f'fill="{colour(1)}"' in sparse  # the legend's swatch too
    assert "ok" not in sparse.split('class="legend"')[1]
