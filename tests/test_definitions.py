"""Each loss definition (fastcon/losses/) against itself and against the kernels' tile math.

* Splitting a row's contrast set into column tiles (an empty one included), computing each
  tile's statistics and merging them gives the statistics of one tile.
* The native C++ kernel's statistics of a tile equal the Python definition's (the Triton
  kernels' are checked the same way under the interpreter, ``tests/triton_cases_interpret.py``).
* No code in ``fastcon/`` outside the definitions branches on a loss's name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastcon.losses import DEFINITIONS, FocalSupCon, SCHaNe, SupCon
from tests.cases import assert_engine_tile_stats, definition_tile_stats, tile_problem

DEFS = [SupCon(0.1, 0.07), SCHaNe(0.2, 1.5), SCHaNe(0.3, 0.0), FocalSupCon(0.1, 0.07, 2.0)]
IDS = [f"{d.name}-{i}" for i, d in enumerate(DEFS)]


def _masks(anchors, contrast, self_offset):
    same = anchors.ranks[:, None] == contrast.ranks[None, :]
    not_self = torch.ones_like(same)
    rows = torch.arange(anchors.x.shape[0])
    not_self[rows, rows + self_offset] = False
    return not_self, same & not_self, ~same


@pytest.mark.parametrize("definition", DEFS, ids=IDS)
@pytest.mark.parametrize("cuts", [(0, 7, 7, 8, 23), (0, 1, 2, 3, 11, 22, 23), (0, 23)])
def test_tiles_merged_equal_one_tile(definition, cuts):
    anchors, contrast = tile_problem()
    s = anchors.x @ contrast.x.T / definition.temperature
    not_self, pos, neg = _masks(anchors, contrast, 2)
    dense_mask = definition.dense_mask(not_self, pos, neg)
    whole_d = definition.dense_tile(s.clone(), dense_mask)
    whole_p = definition.positive_tile(s.clone(), pos, whole_d)
    rows = s.shape[0]
    merged_d = definition.empty(definition.dense_slots, rows, s.dtype, s.device)
    merged_p = definition.empty(definition.positive_slots, rows, s.dtype, s.device)
    for c0, c1 in zip(cuts[:-1], cuts[1:]):  # (7, 7) is an empty tile
        part_d = definition.dense_tile(s[:, c0:c1].clone(), dense_mask[:, c0:c1])
        # the positive part reads the *finished* dense statistics (focal SupCon's row LSE)
        part_p = definition.positive_tile(s[:, c0:c1].clone(), pos[:, c0:c1], whole_d)
        merged_d = definition.merge(definition.dense_slots, merged_d, part_d)
        merged_p = definition.merge(definition.positive_slots, merged_p, part_p)
    torch.testing.assert_close(merged_d, whole_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged_p, whole_p, rtol=1e-12, atol=1e-12)
    # and the statistics are not trivial: every slot differs between rows
    assert all(torch.unique(x[torch.isfinite(x)]).numel() > 2 for x in torch.cat([whole_d, whole_p]))


@pytest.mark.parametrize("definition", DEFS, ids=IDS)
def test_merge_order_does_not_matter(definition):
    anchors, contrast = tile_problem(seed=1)
    a_d, a_p = definition_tile_stats(definition, anchors, contrast, 2)
    b_d, b_p = definition_tile_stats(definition, anchors, contrast, None)
    for slots, a, b in ((definition.dense_slots, a_d, b_d), (definition.positive_slots, a_p, b_p)):
        torch.testing.assert_close(definition.merge(slots, a, b), definition.merge(slots, b, a), rtol=0, atol=0)
        empty = definition.empty(slots, a.shape[1], a.dtype, a.device)
        torch.testing.assert_close(definition.merge(slots, a, empty), a, rtol=0, atol=0)


@pytest.mark.parametrize("definition", DEFS, ids=IDS)
def test_native_tile_stats_equal_the_definition(definition):
    import fastcon.native
    from fastcon.backends.native import NativeEngine

    assert fastcon.native.is_available(), fastcon.native.import_error()
    assert_engine_tile_stats(NativeEngine(), definition)
    assert_engine_tile_stats(NativeEngine(), definition, dtype=torch.float32, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("definition", DEFS, ids=IDS)
def test_blockwise_tile_stats_equal_the_definition(definition):
    from fastcon.backends import blockwise

    assert_engine_tile_stats(blockwise.BlockwiseEngine(), definition)


def test_every_definition_is_registered_and_checked():
    assert {d.name for d in DEFS} == set(DEFINITIONS)
    ids = [d.kernel_id for d in DEFINITIONS.values()]
    assert sorted(ids) == list(range(len(ids)))  # one branch per kernel language each


LOSS_NAMES = set(DEFINITIONS) | {"focal_supcon", "clce"}


def _name_branches(path: Path):
    """Comparisons of a value against a loss name (``kind == "schane"``, ``name in ("supcon", ...)``)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for comp in [node.left, *node.comparators]:
                values = [comp] if isinstance(comp, ast.Constant) else \
                    list(comp.elts) if isinstance(comp, (ast.Tuple, ast.List, ast.Set)) else []
                if any(isinstance(v, ast.Constant) and v.value in LOSS_NAMES for v in values):
                    found.append(f"{path}:{node.lineno}")
        if isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant) and \
                node.value.value in LOSS_NAMES:
            found.append(f"{path}:{node.lineno}")
    return found


def test_no_code_branches_on_a_loss_name_outside_its_definition():
    root = Path(__file__).resolve().parent.parent / "fastcon"
    # the harness's recipes (ce, supcon, core, ...) are training recipes, not loss definitions
    allowed = {root / "harness", root / "losses"}
    offenders = []
    for path in root.rglob("*.py"):
        if not any(a in path.parents for a in allowed):
            offenders += _name_branches(path)
    assert not offenders, offenders
